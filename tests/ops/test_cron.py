"""``run.py crontab``: schedules as cron reads them, and a line that runs the job under cron's
bare environment (run here with ``env -i`` and ``sh -c``, as cron does)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from etl.core.errors import ConfigError
from etl.ops.cron import check_schedule
from tests.conftest import write_trips_csv

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = str(ROOT / "run.py")

JOB = """
[job]
name = "nightly"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[transform]
executor = "serial"

[output]
path = "out"
"""


@pytest.mark.parametrize(
    "text, normal",
    [
        ("0 * * * *", "0 * * * *"),
        ("  */15   9-17 * * mon-fri ", "*/15 9-17 * * mon-fri"),
        ("0 0 1 jan,JUL 0,7", "0 0 1 jan,JUL 0,7"),
        ("5-59/10 0-23/2 1-31 1-12 0-6", "5-59/10 0-23/2 1-31 1-12 0-6"),
        ("@Hourly", "@hourly"),
        ("@reboot", "@reboot"),
    ],
)
def test_valid_schedules(text: str, normal: str) -> None:
    assert check_schedule(text) == normal


@pytest.mark.parametrize(
    "text, says",
    [
        ("0 * * *", "expected 5 fields"),
        ("0 * * * * *", "got 6"),
        ("60 * * * *", "minute field '60': 60 is outside 0-59"),
        ("0 24 * * *", "hour field"),
        ("0 0 0 * *", "day of month field '0'"),
        ("0 0 * 13 *", "month field '13'"),
        ("0 0 * * 8", "day of week field '8'"),
        ("*/0 * * * *", "at least 1"),
        ("*/61 * * * *", "larger than the field's range"),
        ("5/10 * * * *", "a step needs '*' or a range"),
        ("10-5 * * * *", "runs backwards"),
        ("0 0 * * mon-fry", "'fry' is not a number or a name"),
        ("0 0 * foo *", "not a number or a name (jan"),
        ("1,,2 * * * *", "is not a number"),
        ("@every 5m", "unknown macro"),
    ],
)
def test_bad_schedules_name_the_field_and_rule(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_schedule(text)
    assert says in str(e.value) and e.value.item == "--schedule"


def crontab(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, RUN_PY, "crontab", "--config", str(cfg), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd="/")


def test_bad_schedule_exits_2(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_trips_csv(tmp_path / "data" / "a.csv", rows=10, seed=0)
    cfg = tmp_path / "job.toml"
    cfg.write_text(JOB)
    proc = crontab(cfg, "--schedule", "0 25 * * *")
    assert proc.returncode == 2 and "hour field '25'" in proc.stderr and proc.stdout == ""


def test_printed_line_runs_the_job_under_crons_environment(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs 100%"  # a space and a % : both must survive the crontab line
    (job_dir / "data").mkdir(parents=True)
    write_trips_csv(job_dir / "data" / "a.csv", rows=40, seed=0)
    cfg = job_dir / "job.toml"
    cfg.write_text(JOB)
    metrics = tmp_path / "metrics" / "nightly.prom"
    proc = crontab(cfg, "--schedule", "*/5 * * * 1-5", "--metrics-file", str(metrics))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith("*/5 * * * 1-5 ")
    command = line.removeprefix("*/5 * * * 1-5 ")
    assert "%" not in command.replace("\\%", "")  # cron would cut the line at a bare %
    argv = shlex.split(command.replace("\\%", "%"))
    state_logs = job_dir / "state" / "nightly" / "logs"
    assert argv[:5] == [sys.executable, RUN_PY, "run", "--config", str(cfg)]
    assert argv[argv.index("--log-file") + 1] == str(state_logs / "cron.log")
    assert argv[argv.index("--log-format") + 1] == "json"
    assert argv[argv.index("--metrics-file") + 1] == str(metrics)
    assert argv[-3:] == [">>", str(state_logs / "cron.out"), "2>&1"]
    assert state_logs.is_dir()  # the redirect needs its folder before the first run

    # cron runs the command with sh, a bare environment and no terminal, from $HOME.
    run = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", command.replace("\\%", "%")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, (state_logs / "cron.out").read_text()
    assert run.stdout == run.stderr == ""  # everything went to the log files
    logs = (state_logs / "cron.log").read_text().splitlines()
    assert logs and all(json.loads(line)["run_id"] for line in logs)
    assert list((job_dir / "out").glob("*.parquet")) and metrics.exists()


def test_vars_cron_will_not_have_are_named_and_the_advice_works(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_trips_csv(tmp_path / "data" / "a.csv", rows=20, seed=0)
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        JOB.replace(
            'executor = "serial"', 'executor = "serial"\nsteps = [{op = "filter", expr = "${ETL_TEST_FILTER}"}]'
        )
        + '\n[download]\nheaders = {Authorization = "Bearer ${ETL_TEST_TOKEN}", X = "${ETL_TEST_OPTIONAL:-none}"}\n'
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "ETL_TEST_TOKEN": "t0k",
        "ETL_TEST_FILTER": "notnull(fare)",
        "ETL__READ__THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, RUN_PY, "crontab", "--config", str(cfg), "--schedule", "@daily"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "${ETL_TEST_TOKEN} (download.headers.Authorization)" in err
    assert "${ETL_TEST_FILTER} (transform.steps[0].expr)" in err
    assert "ETL__READ__THREADS overrides the job here" in err
    assert "ETL_TEST_OPTIONAL" not in err  # it has a default
    prefix = next(line.strip() for line in err.splitlines() if line.strip().startswith("set -a;"))
    command = proc.stdout.strip().removeprefix("@daily ").replace("\\%", "%")
    bare = ["env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c"]
    failed = subprocess.run([*bare, command], check=False, timeout=120, cwd="/", stdin=subprocess.DEVNULL)
    assert failed.returncode == 2  # as warned: the variables are missing under cron
    env_file = cfg.with_suffix(".env")
    env_file.write_text("ETL_TEST_TOKEN=t0k\nETL_TEST_FILTER='notnull(fare)'\n")
    env_file.chmod(0o600)
    ok = subprocess.run([*bare, f"{prefix} {command}"], check=False, timeout=120, cwd="/", stdin=subprocess.DEVNULL)
    assert ok.returncode == 0, (tmp_path / "state" / "nightly" / "logs" / "cron.out").read_text()
    assert list((tmp_path / "out").glob("*.parquet"))

"""Unattended runs, as cron starts them: lock, resume after kill -9 and signals, incremental
reruns, dry run, source checks, logs without a terminal, the run report and the metrics file.

Every test starts real ``python run.py`` processes; HTTP sources come from a real server on
127.0.0.1. "Mid-run" is found by reading the run's JSON log for the manifest's first save
(a source committed), never by sleeping.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pyarrow.dataset as ds
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import write_trips_csv
from tests.http_server import Stall, serve_folder_in_thread

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = str(ROOT / "run.py")
WAIT = 120  # seconds a test waits for a process before failing (a hang, never a timing check)


def job_toml(
    sources: list[str], *, out: str = "out", state: str = "state", mode: str = "overwrite", executor: str = "thread"
) -> str:
    urls = ", ".join(json.dumps(s) for s in sources)
    return f"""
[job]
name = "cron"
state_dir = "{state}"

[sources]
urls = [{urls}]

[download]
retry = {{attempts = 1}}
timeout = {{read = 60}}

[read]
chunk_rows = 60

[transform]
executor = "{executor}"
workers = 2
on_error = "skip"
steps = [
  {{op = "cast", columns = {{fare = "float64", zone = "int64"}}}},
  {{op = "filter", expr = "fare > 0"}},
]

[output]
path = "{out}"
partition_by = ["zone"]
mode = "{mode}"
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for k in range(4):
        write_trips_csv(d / f"t{k}.csv", rows=300 + 11 * k, seed=k, start_id=10_000 * k)
    return d


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, RUN_PY, *(args or ("run",)), "--config", str(cfg)]
    if not args:
        cmd.append("--quiet")
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=WAIT, env=env, stdin=subprocess.DEVNULL
    )


def start(cfg: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, RUN_PY, "run", "--config", str(cfg), "--quiet", "--log-format", "json", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_commit(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Read the run's JSON log until the manifest is first saved with a committed source."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # blocks on the pipe; EOF if the run ends first
        entry = json.loads(line)
        seen.append(entry)
        if entry["message"].startswith("manifest saved"):
            return seen
    raise AssertionError(f"run ended (exit {proc.wait()}) before committing a source: {seen}")


def rows_digest(out: Path) -> tuple[int, str]:
    """Row count and a hash of the rows, independent of file and row order."""
    df = ds.dataset(out, format="parquet", partitioning="hive").to_table().to_pandas()
    df = df[sorted(df.columns)].astype(str).sort_values("trip_id").reset_index(drop=True)
    return len(df), hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()


def layout(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def leftovers(root: Path) -> list[Path]:
    names = (".out.tmp-", ".out.old-")
    return [p for p in root.rglob("*") if p.name.startswith(names) or p.name.endswith((".inprogress", ".tmp"))]


def last_report(state: Path) -> dict[str, Any]:
    reports = sorted((state / "cron" / "reports").glob("run-*.json"))
    return json.loads(reports[-1].read_text())


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["status"] for s in report["sources"]}


def clean_run(tmp_path: Path, sources: list[str]) -> tuple[tuple[int, str], list[str]]:
    """The reference: the same job, fresh state and output, run once without interruption."""
    cfg = write(tmp_path, job_toml(sources, out="clean-out", state="clean-state"), "clean.toml")
    proc = run(cfg)
    assert proc.returncode in (0, 3), proc.stderr
    return rows_digest(tmp_path / "clean-out"), layout(tmp_path / "clean-out")


@pytest.fixture
def stalled_server(data: Path) -> Iterator[str]:
    """Serves ``data``; the first request for t3.csv stalls after 4 KiB until the server stops."""
    base, stop = serve_folder_in_thread(data, {"t3.csv": [Stall(after_bytes=4096)]})
    yield base
    stop()


# ----------------------------------------------------------------------------- lock


def test_second_run_while_locked_exits_75_and_touches_nothing(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    lock = tmp_path / "state" / "cron" / "lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running run holds it
        proc = run(cfg)
    assert proc.returncode == 75, proc.stderr
    assert "skipped: already running" in proc.stderr and proc.stderr.count("[lock]") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "state" / "cron" / "reports").exists()
    assert run(cfg).returncode == 0  # the lock went with its holder


def test_two_real_runs_at_once_second_is_skipped(tmp_path: Path, data: Path, stalled_server: str) -> None:
    cfg = write(tmp_path, job_toml([f"{stalled_server}/t{k}.csv" for k in range(4)]))
    first = start(cfg)
    try:
        wait_for_commit(first)  # it holds the lock and is stuck on t3.csv
        second = run(cfg)
        assert second.returncode == 75, second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(WAIT) == 143


# ------------------------------------------------------------------ kill -9 / signals


def test_kill_9_mid_run_then_rerun_equals_a_clean_run(tmp_path: Path, data: Path, stalled_server: str) -> None:
    sources = [f"{stalled_server}/t{k}.csv" for k in range(4)]
    cfg = write(tmp_path, job_toml(sources))
    proc = start(cfg)
    wait_for_commit(proc)
    proc.kill()
    proc.wait(WAIT)
    manifest = json.loads((tmp_path / "state" / "cron" / "manifest.json").read_text())
    committed = {e["name"] for e in manifest["pending"]["sources"].values()}
    assert committed and "t3.csv" not in committed and not (tmp_path / "out").exists()

    again = run(cfg)  # t3.csv's script is used up: served normally now
    assert again.returncode == 0, again.stderr
    report = last_report(tmp_path / "state")
    assert {n for n, s in statuses(report).items() if s == "resumed"} == committed
    assert statuses(report)["t3.csv"] == "processed"
    assert (rows_digest(tmp_path / "out"), layout(tmp_path / "out")) == clean_run(tmp_path, sources)
    parts = len(layout(tmp_path / "out"))  # files are cut again from the resumed run's spool
    assert f"  output   {parts} parts published\n" in again.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_stops_workers_saves_state_and_rerun_completes(
    tmp_path: Path, data: Path, stalled_server: str, signum: int, code: int
) -> None:
    sources = [f"{stalled_server}/t{k}.csv" for k in range(4)]
    cfg = write(tmp_path, job_toml(sources, executor="process"))
    proc = start(cfg)
    wait_for_commit(proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the forkserver and the transform workers
    proc.send_signal(signum)
    assert proc.wait(WAIT) == code
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert not (tmp_path / "out").exists()  # nothing half-published
    report = last_report(tmp_path / "state")
    assert report["status"] == "interrupted" and report["exit_code"] == code
    manifest = json.loads((tmp_path / "state" / "cron" / "manifest.json").read_text())
    assert manifest["pending"]["sources"] and Path(manifest["pending"]["tmp"]).is_dir()
    assert json.loads((tmp_path / "state" / "cron" / "sources.json").read_text())["files"]

    again = run(cfg)
    assert again.returncode == 0, again.stderr
    assert "resumed" in statuses(last_report(tmp_path / "state")).values()
    assert rows_digest(tmp_path / "out") == clean_run(tmp_path, sources)[0]
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ incremental runs


def test_unchanged_sources_are_skipped_and_output_stays_a_clean_runs(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    assert run(cfg).returncode == 0
    first = rows_digest(tmp_path / "out"), layout(tmp_path / "out")
    (data / "t1.csv").touch()  # new mtime, same bytes: the sha256 says unchanged
    assert run(cfg).returncode == 0
    assert set(statuses(last_report(tmp_path / "state")).values()) == {"unchanged"}
    assert (rows_digest(tmp_path / "out"), layout(tmp_path / "out")) == first

    write_trips_csv(data / "t2.csv", rows=120, seed=99, start_id=20_000)
    assert run(cfg).returncode == 0
    assert statuses(last_report(tmp_path / "state")) == {
        "t0.csv": "unchanged",
        "t1.csv": "unchanged",
        "t2.csv": "processed",
        "t3.csv": "unchanged",
    }
    sources = [str(p) for p in sorted(data.glob("t*.csv"))]
    assert (rows_digest(tmp_path / "out"), layout(tmp_path / "out")) == clean_run(tmp_path, sources)


def test_removed_source_shifts_indexes_and_output_matches_a_clean_run(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    assert run(cfg).returncode == 0
    (data / "t0.csv").unlink()  # every other source moves down one index
    assert run(cfg).returncode == 0
    assert set(statuses(last_report(tmp_path / "state")).values()) == {"unchanged"}
    sources = [str(p) for p in sorted(data.glob("t*.csv"))]
    assert (rows_digest(tmp_path / "out"), layout(tmp_path / "out")) == clean_run(tmp_path, sources)


def test_full_refresh_processes_everything_again(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    assert run(cfg).returncode == 0
    before = rows_digest(tmp_path / "out")
    proc = run(cfg, "run", "--quiet", "--full-refresh")
    assert proc.returncode == 0, proc.stderr
    assert set(statuses(last_report(tmp_path / "state")).values()) == {"processed"}
    assert rows_digest(tmp_path / "out") == before


def test_append_rerun_never_appends_a_source_twice(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"], mode="append"))
    assert run(cfg).returncode == 0
    once = rows_digest(tmp_path / "out")
    assert run(cfg).returncode == 0
    assert rows_digest(tmp_path / "out") == once
    write_trips_csv(data / "t4.csv", rows=50, seed=4, start_id=40_000)
    assert run(cfg).returncode == 0
    assert statuses(last_report(tmp_path / "state"))["t4.csv"] == "processed"
    sources = [str(p) for p in sorted(data.glob("t*.csv"))]
    assert rows_digest(tmp_path / "out") == clean_run(tmp_path, sources)[0]


# ------------------------------------------------------------------------ commands


def test_dry_run_lists_the_plan_and_runs_nothing(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    proc = run(cfg, "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" process ") == 4 and str(tmp_path / "out") in proc.stdout
    assert "mode overwrite" in proc.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()
    assert run(cfg).returncode == 0
    write_trips_csv(data / "t0.csv", rows=10, seed=5)
    plan = run(cfg, "run", "--dry-run").stdout
    assert plan.count("skip: unchanged") == 3 and "process: changed" in plan
    assert "0 to process" not in plan and "1 to process, 3 to skip" in plan


def test_dry_run_predicts_skips_with_a_planned_chunk_size(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]).replace("chunk_rows = 60", ""))  # the plan picks it
    first = run(cfg, "run", "--quiet", "--log-format", "json")
    assert first.returncode == 0, first.stderr
    (summary,) = [json.loads(x)["summary"] for x in first.stderr.splitlines() if '"summary"' in x]
    assert summary["sources"] == 4 and summary["parts_published"] == len(layout(tmp_path / "out"))
    before = {p: (tmp_path / "out" / p).read_bytes() for p in layout(tmp_path / "out")}
    plan = run(cfg, "run", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "0 to process, 4 to skip" in plan.stdout
    # a smaller budget plans other chunk sizes (or threads): the rows are the same, so the
    # sources are still skipped, as the dry run said
    again = run(cfg, "run", "--quiet", "--set", 'resources.memory_limit="300MiB"')
    assert again.returncode == 0 and set(statuses(last_report(tmp_path / "state")).values()) == {"unchanged"}
    # the skipped sources' rows are read back from the published files and cut again: same bytes
    assert f"  output   {summary['parts_published']} parts published\n" in again.stderr
    assert {p: (tmp_path / "out" / p).read_bytes() for p in layout(tmp_path / "out")} == before


def test_dry_run_asks_http_servers_and_predicts_what_the_run_does(tmp_path: Path, data: Path) -> None:
    base, stop = serve_folder_in_thread(data)
    try:
        cfg = write(tmp_path, job_toml([f"{base}/t{k}.csv" for k in range(4)]))
        first = run(cfg, "run", "--dry-run")
        assert first.returncode == 0 and "0 to skip" in first.stdout and "server:" not in first.stdout
        assert not (tmp_path / "state").exists()  # a dry run writes nothing, not even state
        assert run(cfg).returncode == 0
        write_trips_csv(data / "t2.csv", rows=50, seed=9, start_id=90_000)  # new content, new ETag
        plan = run(cfg, "run", "--dry-run").stdout
        assert plan.count("skip (server: not modified)") == 3 and plan.count("(server: modified)") == 1
        assert "1 to process, 3 to skip" in plan and "to ask the server" not in plan
        assert run(cfg).returncode == 0  # the run does what the dry run said
        got = statuses(last_report(tmp_path / "state"))
        assert got == {"t0.csv": "unchanged", "t1.csv": "unchanged", "t2.csv": "processed", "t3.csv": "unchanged"}
    finally:
        stop()


def test_schema_and_validate_explain(tmp_path: Path, data: Path) -> None:
    schema = subprocess.run([sys.executable, RUN_PY, "schema"], check=True, capture_output=True, text=True)
    doc = json.loads(schema.stdout)
    assert doc["properties"]["transform"]["description"] and "workers" in doc["$defs"]["TransformConfig"]["properties"]
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    env = {"PATH": "/usr/bin:/bin", "ETL__TRANSFORM__WORKERS": "3", "ETL__READ__THREADS": "1"}
    proc = run(cfg, "validate", "--explain", "--set", "read.threads=4", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "transform.workers = 3    # environment ETL__TRANSFORM__WORKERS" in lines
    assert "read.threads = 4    # --set" in lines  # --set beats the environment
    assert "read.chunk_rows = 60    # job file" in lines and "download.per_host = 4    # default" in lines
    bad = run(cfg, "validate", env={**env, "ETL__TRANSFORM__WORKES": "2", "ETL__OUTPUT__MODE": "upsert"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        "2 problems:" in bad.stderr
        and "did you mean 'workers'? (set by environment ETL__TRANSFORM__WORKES)" in bad.stderr
    )


def test_validate_check_sources_names_each_failing_source(tmp_path: Path, data: Path) -> None:
    base, stop = serve_folder_in_thread(data)
    one_at_a_time = ("--set", "download.concurrency=1")  # the HEADs share a kept-alive connection
    try:
        good = write(tmp_path, job_toml([f"{base}/t{k}.csv" for k in range(4)]), "good.toml")
        ok = run(good, "validate", "--check-sources", *one_at_a_time)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "4 of 4 sources OK" in ok.stdout
        bad = write(
            tmp_path, job_toml([f"{base}/t0.csv", f"{base}/missing.csv", "http://127.0.0.1:9/x.csv"]), "bad.toml"
        )
        proc = run(bad, "validate", "--check-sources", *one_at_a_time)
    finally:
        stop()
    assert proc.returncode == 1
    assert f"FAILED {base}/missing.csv: HTTP 404" in proc.stdout
    assert "FAILED http://127.0.0.1:9/x.csv" in proc.stdout and "1 of 3 sources OK" in proc.stdout
    broken = write(tmp_path, job_toml(["data/t*.csv"]).replace('mode = "overwrite"', 'mode = "replace"'), "x.toml")
    assert run(broken, "validate", "--check-sources").returncode == 2


def test_help_documents_every_exit_code() -> None:
    out = subprocess.run([sys.executable, RUN_PY, "run", "--help"], check=False, capture_output=True, text=True).stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "75 ", "130 ", "143 "):
        assert f"\n  {code}" in out or f", {code}" in out


# -------------------------------------------------------------------- logs, report


def test_no_control_characters_under_env_i_without_a_terminal(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    proc = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", sys.executable, RUN_PY, "--config", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert "rows" in proc.stderr  # the summary is there, as plain lines
    bad = [c for c in proc.stdout + proc.stderr if ord(c) < 32 and c not in "\n\t"]
    assert bad == [] and "\x1b" not in proc.stderr


def test_report_and_metrics_file_parse(tmp_path: Path, data: Path) -> None:
    cfg = write(tmp_path, job_toml(["data/t*.csv"]))
    metrics = tmp_path / "textfile" / "etl_cron.prom"
    proc = run(cfg, "run", "--quiet", "--metrics-file", str(metrics), "--log-format", "json")
    assert proc.returncode in (0, 3), proc.stderr
    for line in proc.stderr.splitlines():
        entry = json.loads(line)
        assert {"time", "level", "stage", "source", "message", "run_id"} <= entry.keys()
    report = last_report(tmp_path / "state")
    for key in (
        "run_id",
        "job",
        "config_hash",
        "start",
        "end",
        "status",
        "exit_code",
        "sources",
        "rows",
        "bytes",
        "stage_seconds",
    ):
        assert key in report, key
    assert report["status"].startswith("success") and report["exit_code"] == proc.returncode
    assert [s["status"] for s in report["sources"]] == ["processed"] * 4
    assert report["rows"]["out"] == rows_digest(tmp_path / "out")[0] == sum(s["rows_out"] for s in report["sources"])
    assert set(report["stage_seconds"]) == {"download", "read", "transform", "write"}
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    value = {f: families[f].samples[0].value for f in families}
    assert value["etl_last_success_timestamp_seconds"] == pytest.approx(report["end"], abs=1e-3)
    assert value["etl_run_success"] == 1 and value["etl_run_exit_code"] == proc.returncode
    rows = {s.labels["kind"]: s.value for s in families["etl_rows"].samples}
    assert rows == {k: report["rows"][k] for k in ("in", "out", "rejected")}
    assert [p.name for p in metrics.parent.iterdir()] == ["etl_cron.prom"]  # no temp file left


def test_an_unexpected_error_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug (not an input) still ends as the documented exit 1 with one line, no traceback;
    the traceback is there with --log-level DEBUG. Reaching a bug needs one to be planted."""
    from etl import cli

    def broken(args: object) -> int:
        raise RuntimeError("planted")

    monkeypatch.setattr(cli, "_dispatch", broken)
    assert cli.main(["validate", "--config", "job.toml"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: planted" in err and "Traceback" not in err
    assert cli.main(["validate", "--config", "job.toml", "--log-level", "DEBUG"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------- leaving the process


def exit_script(body: str) -> subprocess.CompletedProcess[str]:
    code = f"import atexit, sys, threading, time\nfrom etl.cli import exit_now\n{body}"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=WAIT)


def test_exit_now_flushes_the_streams_and_runs_the_exit_handlers_first(tmp_path: Path) -> None:
    mark = tmp_path / "handler-ran"
    done = exit_script(
        f"atexit.register(lambda: open({str(mark)!r}, 'w').write('ran'))\n"
        "sys.stdout.write('buffered, no newline'); sys.stderr.write('said')\n"
        "exit_now(3)"
    )
    assert done.returncode == 3
    assert done.stdout == "buffered, no newline" and done.stderr == "said"
    assert mark.read_text() == "ran"


def test_exit_now_waits_for_a_thread_still_working(tmp_path: Path) -> None:
    """A non-daemon thread (a pool someone did not join) is waited for, as Python does."""
    out = tmp_path / "late"
    done = exit_script(
        f"t = threading.Thread(target=lambda: (time.sleep(0.3), open({str(out)!r}, 'w').write('done')))\n"
        "t.start()\nexit_now(0)"
    )
    assert done.returncode == 0 and out.read_text() == "done"


def test_a_run_log_file_is_whole_when_the_process_has_left(tmp_path: Path, data: Path) -> None:
    (tmp_path / "job.toml").write_text(job_toml([str(data / "*.csv")]))
    log = tmp_path / "run.log"
    done = subprocess.run(
        [sys.executable, RUN_PY, "--config", "job.toml", "--log-format", "json", "--log-file", str(log)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode in (0, 3), done.stderr
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)  # every record whole, none cut by the exit
    assert any("published" in json.loads(line).get("message", "") for line in lines), lines[-3:]

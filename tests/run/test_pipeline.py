"""End to end: `python run.py --config job.toml` over local files and HTTP, against plain pandas."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from tests.conftest import JobWriter

ROOT = Path(__file__).resolve().parents[2]

STEPS = """
[transform]
executor = "{executor}"
workers = 2
steps = [
  {{op = "cast", columns = {{passengers = "Int64", fare = "float64", tip = "float64", distance = "float64", zone = "int64"}}}},
  {{op = "parse_datetime", columns = ["pickup_at", "dropoff_at"], format = "%Y-%m-%d %H:%M:%S"}},
  {{op = "filter", expr = "fare > 0"}},
  {{op = "fillna", values = {{tip = 0.0}}}},
  {{op = "derive", columns = {{minutes = "minutes(dropoff_at - pickup_at)", tip_ratio = "tip / fare", month = 'strftime(pickup_at, "%Y-%m")'}}}},
  {{op = "lookup", path = "data/zones.csv", on = "zone", right_on = "zone_id", columns = ["borough"]}},
  {{op = "drop", columns = ["note"]}},
]
"""


def job_text(
    sources: str,
    executor: str = "process",
    chunk_rows: int = 50,
    out: str = "out",
    fmt: str = "parquet",
    extra: str = "",
) -> str:
    return f"""
[job]
name = "e2e"
state_dir = "state"

[sources]
urls = {sources}

[read]
chunk_rows = {chunk_rows}
{STEPS.format(executor=executor)}
[output]
path = "{out}"
format = "{fmt}"
partition_by = ["month"]
{extra}
"""


def plain_pandas(files: list[Path], zones: Path) -> pd.DataFrame:
    """The same job written as a plain, single-process pandas script on the whole input."""
    df = pd.concat([pd.read_csv(f, dtype=str, keep_default_na=False, na_values=[""]) for f in files], ignore_index=True)
    df["passengers"] = pd.to_numeric(df["passengers"].str.strip()).astype("Int64")
    for col in ("fare", "tip", "distance"):
        df[col] = pd.to_numeric(df[col].str.strip())
    df["zone"] = df["zone"].astype("int64")
    for col in ("pickup_at", "dropoff_at"):
        df[col] = pd.to_datetime(df[col], format="%Y-%m-%d %H:%M:%S")
    df = df[df["fare"] > 0].copy()
    df["tip"] = df["tip"].fillna(0.0)
    df["minutes"] = (df["dropoff_at"] - df["pickup_at"]).dt.total_seconds() / 60
    df["tip_ratio"] = df["tip"] / df["fare"]
    df["month"] = df["pickup_at"].dt.strftime("%Y-%m")
    z = pd.read_csv(zones)
    df = df.merge(z, left_on="zone", right_on="zone_id", how="left").drop(columns=["zone_id", "note"])
    return df


def read_output(out: Path, fmt: str = "parquet") -> pd.DataFrame:
    table = ds.dataset(out, format=fmt, partitioning="hive", exclude_invalid_files=True).to_table()
    return table.to_pandas()


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Compare values, not storage types: both sides to plain object columns, sorted by id."""
    df = df.sort_values("trip_id", key=lambda s: s.astype("int64")).reset_index(drop=True)
    out = pd.DataFrame(index=df.index)
    for col in sorted(df.columns):
        s = df[col]
        if pd.api.types.is_datetime64_any_dtype(s):
            s = s.astype("datetime64[us]").astype(str)
        elif pd.api.types.is_float_dtype(s):
            s = s.astype("float64").round(9)
        out[col] = s.astype(object).where(s.notna(), None)
    out["trip_id"] = out["trip_id"].astype(str)
    out["month"] = out["month"].astype(str)
    return out


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=config.parent,
    )


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_local_job_equals_plain_pandas(trips_dir: Path, write_job: JobWriter) -> None:
    cfg = write_job(job_text('["data/trips-*.csv"]'))
    proc = run_cli(cfg, "--quiet")
    assert proc.returncode == 0, proc.stderr
    expected = plain_pandas(sorted(trips_dir.glob("trips-*.csv")), trips_dir / "zones.csv")
    got = read_output(cfg.parent / "out")
    pd.testing.assert_frame_equal(normalise(got), normalise(expected))
    assert {p.name for p in (cfg.parent / "out").iterdir()} == {f"month=2026-0{m}" for m in (1, 2, 3)}
    assert "rows" in proc.stderr and "rows/s" in proc.stderr  # the end-of-run summary


@pytest.mark.parametrize("executor", ["serial", "thread"])
def test_every_executor_writes_the_same_output(trips_dir: Path, write_job: JobWriter, executor: str) -> None:
    ref = write_job(job_text('["data/trips-*.csv"]', executor="process", out="out-process"), "ref.toml")
    other = write_job(job_text('["data/trips-*.csv"]', executor=executor, out=f"out-{executor}"), "other.toml")
    assert run_cli(ref, "--quiet").returncode == 0
    assert run_cli(other, "--quiet").returncode == 0
    assert tree_digest(ref.parent / "out-process") == tree_digest(other.parent / f"out-{executor}")


def test_http_sources_equal_local_sources(trips_dir: Path, write_job: JobWriter) -> None:
    from tests.http_server import serve_folder_in_thread

    base_url, stop = serve_folder_in_thread(trips_dir)
    try:
        urls = f'["{base_url}/trips-{{0..2}}.csv"]'
        http_job = write_job(job_text(urls, out="out-http"), "http.toml")
        proc = run_cli(http_job, "--quiet")
        assert proc.returncode == 0, proc.stderr
    finally:
        stop()
    local_job = write_job(job_text('["data/trips-*.csv"]', out="out-local"), "local.toml")
    assert run_cli(local_job, "--quiet").returncode == 0
    assert tree_digest(http_job.parent / "out-http") == tree_digest(local_job.parent / "out-local")


def test_csv_output(trips_dir: Path, write_job: JobWriter) -> None:
    cfg = write_job(job_text('["data/trips-*.csv"]', fmt="csv"))
    assert run_cli(cfg, "--quiet").returncode == 0
    got = read_output(cfg.parent / "out", fmt="csv")
    expected = plain_pandas(sorted(trips_dir.glob("trips-*.csv")), trips_dir / "zones.csv")
    assert len(got) == len(expected)
    assert sorted(got["trip_id"].astype(int)) == sorted(expected["trip_id"].astype(int))


def test_failing_step_exits_1_and_keeps_previous_output(trips_dir: Path, write_job: JobWriter) -> None:
    cfg = write_job(job_text('["data/trips-*.csv"]'))
    assert run_cli(cfg, "--quiet").returncode == 0
    before = tree_digest(cfg.parent / "out")
    (trips_dir / "trips-1.csv").write_text((trips_dir / "trips-1.csv").read_text().replace("2026-02-", "2026-XX-", 1))
    proc = run_cli(cfg, "--quiet")
    assert proc.returncode == 1
    assert "trips-1.csv" in proc.stderr and "transform.steps[1] (parse_datetime)" in proc.stderr
    assert "2026-XX-" in proc.stderr  # the offending value
    assert tree_digest(cfg.parent / "out") == before
    assert not [p for p in cfg.parent.iterdir() if p.name.startswith(".out.")]  # temp folder removed


def test_config_error_exits_2_naming_key_and_file(trips_dir: Path, write_job: JobWriter) -> None:
    cfg = write_job(job_text('["data/trips-*.csv"]').replace('expr = "fare > 0"', 'expr = "fare >"'))
    proc = run_cli(cfg, "--quiet")
    assert proc.returncode == 2
    assert "transform.steps[2].expr" in proc.stderr and str(cfg.name) in proc.stderr
    assert not (cfg.parent / "out").exists()


def test_set_override_and_validate_command(trips_dir: Path, write_job: JobWriter) -> None:
    cfg = write_job(job_text('["data/trips-*.csv"]'))
    ok = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "validate", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    proc = run_cli(cfg, "--quiet", "--set", "output.format=csv", "--set", "output.path=out-csv")
    assert proc.returncode == 0, proc.stderr
    assert list((cfg.parent / "out-csv").rglob("*.csv"))
    bad = run_cli(cfg, "--set", "transform.executor=gpu")
    assert bad.returncode == 2 and "transform.executor" in bad.stderr


def test_no_progress_control_characters_without_a_terminal(trips_dir: Path, write_job: JobWriter) -> None:
    cfg = write_job(job_text('["data/trips-*.csv"]'))
    proc = run_cli(
        cfg, env={"PATH": "/usr/bin:/bin", **{k: v for k, v in os.environ.items() if k.startswith("PYTHON")}}
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr


# ------------------------------------------------------------ the probe at small budgets (issue 18)

MEASURE_IN_PARENT = """
import json, sys, psutil
from etl.core.config import load_job
from etl.download.sources import expand_sources
from etl.run.pipeline import measure
cfg = load_job(sys.argv[1])
probe = measure(cfg, expand_sources(cfg))
print(json.dumps({"base": probe.worker_base, "work": probe.worker_work, "rows": probe.rows,
                  "children": len(psutil.Process().children(recursive=True))}))
"""


def test_thread_executors_are_measured_in_the_parent_starting_no_process(tmp_path: Path) -> None:
    """A small budget runs the transform in threads; its probe must not start a ~200 MiB
    worker process beside the parent (it would pass the budget before the run starts)."""
    import json

    from etl.ops.datagen import generate

    generate(tmp_path / "data", rows=30_000, files=1, seed=3)
    (src,) = (tmp_path / "data").glob("*.csv.gz")
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "p"\nstate_dir = "{tmp_path / "state"}"\n[sources]\nurls = ["{src}"]\n'
        '[transform]\nexecutor = "thread"\nsteps = [{op = "cast", columns = {fare_amount = "float64"}}]\n'
        f'[output]\npath = "{tmp_path / "out"}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE_IN_PARENT, str(job)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["children"] == 0  # no probe worker, no fork server, no resource tracker
    assert got["base"] == 0 and got["work"] > 0 and got["rows"] > 1_000


PLANNING_HOG = """
import os
import time

def hog_once(df, *, marker, mib):
    # The first process to call this (the planner's probe worker) holds mib MiB for a
    # second; the run's own workers find the marker and do nothing.
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return df
    block = bytearray(mib << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    time.sleep(1.0)
    return df
"""


def test_the_runs_peak_rss_covers_planning(tmp_path: Path) -> None:
    """The process tree is sampled from before the planner's probe worker starts: memory
    that only the probe uses still shows in the run's peak (the budget counts it)."""
    import asyncio

    from etl.core.config import load_job
    from etl.run.pipeline import RunOptions, run_job
    from tests.conftest import write_trips_csv

    (tmp_path / "data").mkdir()
    write_trips_csv(tmp_path / "data" / "t.csv", rows=200, seed=1)
    (tmp_path / "hog.py").write_text(PLANNING_HOG)
    hog_mib = 400
    (tmp_path / "job.toml").write_text(f"""
[job]
name = "hog"
state_dir = "state"
[sources]
urls = ["data/t.csv"]
[transform]
executor = "process"
workers = 1
steps = [{{op = "python", function = "hog:hog_once", params = {{marker = "{tmp_path / "marker"}", mib = {hog_mib}}}}}]
[output]
path = "out"
""")
    summary = asyncio.run(run_job(load_job(tmp_path / "job.toml"), RunOptions(run_id="hog")))
    assert (tmp_path / "marker").exists() and summary.rows_out == 200
    assert summary.stats["peak_rss_bytes"] > hog_mib << 20


def test_run_ids_sort_in_start_order_within_one_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest report, the last successful run and the reports kept are found by sorting
    run ids: runs started in the same second must still sort in start order."""
    from etl.run import pipeline

    starts = iter([1_800_000_000.0 + k / 1000 for k in (0, 1, 2, 3, 10, 250, 999)] + [1_800_000_001.0])
    monkeypatch.setattr(pipeline.time, "time", lambda: next(starts))
    ids = [pipeline.new_run_id() for _ in range(8)]
    assert sorted(ids) == ids
    assert ids[0].startswith("20270115T080000.000-") and ids[-1].startswith("20270115T080001.000-")
    assert sorted(["20270115T080000-abcdef", ids[0]]) == ["20270115T080000-abcdef", ids[0]]  # ids before this format

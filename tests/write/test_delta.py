"""Delta Lake output (etl/write/delta.py): real runs, real tables, read back by three readers.

Readers: deltalake's ``to_pyarrow_table``, Polars' ``read_delta`` and DuckDB. DuckDB's own
``delta_scan`` needs an extension download and this machine is offline, so DuckDB reads the
table's current files as the Delta log lists them (``DeltaTable.file_uris``) with
``read_parquet(..., hive_partitioning = true)``.

Kill -9: real ``python run.py`` processes, SIGKILLed at moments spread over a clean run's
length, in a loop; the last run must leave the table a clean run leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

deltalake = pytest.importorskip("deltalake")
duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")

from etl.core.config import load_job  # noqa: E402
from etl.core.errors import ChecksFailed, ConfigError, OutputError  # noqa: E402
from etl.core.objstore import filesystem  # noqa: E402
from etl.run.pipeline import RunOptions, RunSummary, run_job  # noqa: E402
from etl.write.delta import PLAN_FILE, partition_type, partition_values  # noqa: E402
from tests.conftest import write_trips_csv  # noqa: E402
from tests.s3 import bucket, s3_endpoint  # noqa: E402

__all__ = ["bucket", "s3_endpoint"]  # fixtures, used by name

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = str(ROOT / "run.py")
WAIT = 120  # seconds a test waits for a process (a hang guard, never a timing check)
KILL_RUNS = 6  # kill -9 loop: runs killed at spread-out moments before the one left to finish
COLUMNS = ["trip_id", "fare", "zone", "month"]


def job_toml(
    sources: str,
    out: str,
    *,
    mode: str = "overwrite",
    state: str = "state",
    partition_by: str = '["month"]',
    extra: str = "",
    chunk_rows: int = 100,
) -> str:
    return f"""
[job]
name = "delta"
state_dir = "{state}"
[sources]
urls = {sources}
[read]
chunk_rows = {chunk_rows}
[transform]
executor = "thread"
workers = 2
steps = [
  {{op = "cast", columns = {{fare = "float64", zone = "int64"}}}},
  {{op = "filter", expr = "fare > 0"}},
  {{op = "parse_datetime", columns = ["pickup_at"], format = "%Y-%m-%d %H:%M:%S"}},
  {{op = "derive", columns = {{month = 'strftime(pickup_at, "%Y-%m")'}}}},
  {{op = "select", columns = ["trip_id", "fare", "zone", "month"]}},
]
[output]
path = "{out}"
format = "delta"
partition_by = {partition_by}
mode = "{mode}"
{extra}
"""


def make_sources(folder: Path, count: int = 3, rows: int = 300) -> str:
    folder.mkdir(exist_ok=True)
    for k in range(count):
        write_trips_csv(folder / f"trips-{k}.csv", rows=rows + 11 * k, seed=k, start_id=10_000 * k)
    return json.dumps([str(folder / "trips-*.csv")])


def run(tmp_path: Path, text: str, run_id: str, name: str = "job.toml") -> RunSummary:
    path = tmp_path / name
    path.write_text(text)
    return asyncio.run(run_job(load_job(path), RunOptions(run_id=run_id, full_refresh=True)))


def expected(folder: Path) -> pd.DataFrame:
    """The rows the job keeps, computed from the CSVs with pandas alone."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in sorted(folder.glob("trips-*.csv"))]
    df = pd.concat(frames, ignore_index=True)
    df["fare"] = pd.to_numeric(df["fare"].str.strip().replace("", None))
    df = df[df["fare"] > 0]
    out = pd.DataFrame(
        {
            "trip_id": df["trip_id"].astype("int64"),
            "fare": df["fare"].astype("float64"),
            "zone": df["zone"].astype("int64"),
            "month": df["pickup_at"].str[:7],
        }
    )
    return normal(out)


def normal(df: pd.DataFrame) -> pd.DataFrame:
    df = df[COLUMNS].astype({"trip_id": "int64", "fare": "float64", "zone": "int64", "month": str})
    return df.sort_values("trip_id", ignore_index=True)


def table(uri: str, options: dict[str, str] | None = None) -> Any:
    return deltalake.DeltaTable(uri, storage_options=options)


def read_pyarrow(uri: str, options: dict[str, str] | None = None) -> pd.DataFrame:
    return normal(table(uri, options).to_pyarrow_table().to_pandas())


def read_polars(uri: str, options: dict[str, str] | None = None) -> pd.DataFrame:
    return normal(pl.read_delta(uri, storage_options=options).to_pandas())


def read_duckdb(uri: str) -> pd.DataFrame:
    """The table's current files from the Delta log, queried by DuckDB (local tables)."""
    dt = table(uri)
    files = dt.file_uris()
    if not files:
        return normal(pd.DataFrame({c: [] for c in COLUMNS}))
    by = dt.metadata().partition_columns  # values from the hive folders the files are in
    types = ", ".join(f"'{c}': 'VARCHAR'" for c in by)
    hive = f"hive_partitioning = true, hive_types = {{{types}}}" if by else "hive_partitioning = false"
    df = duckdb.connect().execute(f"SELECT trip_id, fare, zone, month FROM read_parquet(?, {hive})", [files]).df()
    return normal(df)


def delta_type(dt: Any, column: str) -> Any:
    return next(json.loads(f.type.to_json()) for f in dt.schema().fields if f.name == column)


def versions(uri: str) -> int:
    return int(table(uri).version())


# --------------------------------------------------------------------------- local tables


def test_overwrite_is_one_commit_per_run_and_three_readers_see_the_jobs_rows(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "in")
    uri = str(tmp_path / "table")
    run(tmp_path, job_toml(sources, uri), "r1")
    want = expected(tmp_path / "in")
    assert versions(uri) == 0
    for read in (read_pyarrow, read_polars, read_duckdb):
        pd.testing.assert_frame_equal(read(uri), want)
    dt = table(uri)
    assert dt.metadata().partition_columns == ["month"]
    assert delta_type(dt, "month") == "string"
    first_files = set(dt.file_uris())

    run(tmp_path, job_toml(sources, uri), "r2")
    assert versions(uri) == 1  # one commit for the whole run
    dt = table(uri)
    assert not set(dt.file_uris()) & first_files  # the run replaced every file
    assert all("/r2/" in f for f in dt.file_uris())
    pd.testing.assert_frame_equal(read_pyarrow(uri), want)
    history = dt.history()
    assert [h.get("cronetl.run_id") for h in history] == ["r2", "r1"]
    # time travel: version 0 is still readable, its files still there
    old = deltalake.DeltaTable(uri, version=0)
    pd.testing.assert_frame_equal(normal(old.to_pyarrow_table().to_pandas()), want)


def test_append_adds_one_version_per_run_and_unpartitioned_tables_work(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "in", count=2)
    uri = str(tmp_path / "table")
    text = job_toml(sources, uri, mode="append", partition_by="[]")
    run(tmp_path, text, "a1")
    once = read_pyarrow(uri)
    run(tmp_path, text, "a2")  # full refresh: the same sources appended again, on purpose
    assert versions(uri) == 1
    twice = read_pyarrow(uri)
    assert len(twice) == 2 * len(once)
    pd.testing.assert_frame_equal(twice.drop_duplicates(ignore_index=True), once)
    assert table(uri).metadata().partition_columns == []
    pd.testing.assert_frame_equal(read_polars(uri), twice)
    pd.testing.assert_frame_equal(read_duckdb(uri), twice)


def test_partition_columns_keep_their_type(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "in", count=1)
    uri = str(tmp_path / "table")
    run(tmp_path, job_toml(sources, uri, partition_by='["zone"]'), "z1")
    dt = table(uri)
    assert dt.metadata().partition_columns == ["zone"]
    assert delta_type(dt, "zone") == "long"
    pd.testing.assert_frame_equal(read_pyarrow(uri), expected(tmp_path / "in"))
    pd.testing.assert_frame_equal(read_polars(uri), expected(tmp_path / "in"))


def test_partition_values_and_types_from_hive_folders() -> None:
    assert partition_values("r1/a=x%2Fy/b=__HIVE_DEFAULT_PARTITION__/part-00000.parquet", ["a", "b"], "t") == {
        "a": "x/y",
        "b": None,
    }
    with pytest.raises(OutputError, match="output.partition_by"):
        partition_values("r1/part-00000.parquet", ["a"], "t")
    import pyarrow as pa

    assert partition_type(["1", "-20", None]) == pa.int64()
    assert partition_type(["007", "1"]) == pa.string()  # a code, not a number
    assert partition_type(["true", "false"]) == pa.bool_()
    assert partition_type(["2026-01-31", "2026-02-01"]) == pa.date32()
    assert partition_type(["2026-02-30"]) == pa.string()
    assert partition_type([None]) == pa.string()


def test_a_failed_run_commits_nothing_and_removes_its_files(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "in", count=2)
    uri = str(tmp_path / "table")
    run(tmp_path, job_toml(sources, uri), "good")
    before = read_pyarrow(uri)
    # a check fails after every file is written: nothing is committed
    with pytest.raises(ChecksFailed):
        run(tmp_path, job_toml(sources, uri, extra="[checks]\nmin_rows = 1000000"), "checked")
    # the commit itself is refused: append cannot change a column's type
    bad = job_toml(sources, uri, mode="append").replace('zone = "int64"', 'zone = "string"')
    with pytest.raises(OutputError, match="column 'zone'"):
        run(tmp_path, bad, "retyped")
    assert versions(uri) == 0
    pd.testing.assert_frame_equal(read_pyarrow(uri), before)
    assert sorted(p.name for p in Path(uri).iterdir()) == ["_delta_log", "good"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".table.")] == []


def test_a_plain_folder_is_not_turned_into_a_table_and_csv_is_refused(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "in", count=1)
    out = tmp_path / "plain"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="no _delta_log"):
        run(tmp_path, job_toml(sources, str(out)), "p1")
    (tmp_path / "csv.toml").write_text(
        job_toml(sources, str(tmp_path / "t")).replace('format = "delta"', 'format = "csv"\ntable_format = "delta"')
    )
    with pytest.raises(ConfigError, match="Parquet"):
        load_job(tmp_path / "csv.toml")


def test_a_commit_planned_by_a_killed_run_is_rolled_forward_once(tmp_path: Path) -> None:
    """The run is SIGKILLed right after its plan is saved (the publish point), before
    deltalake commits: the next clean_leftovers makes the commit, and only once."""
    sources = make_sources(tmp_path / "in", count=2)
    uri = str(tmp_path / "table")
    text = job_toml(sources, uri, mode="append")
    run(tmp_path, text, "a1")
    (tmp_path / "job.toml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-c", killed_at_commit(tmp_path / "job.toml", "a2")],
        cwd=ROOT,
        timeout=WAIT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    planned = tmp_path / ".table.commit-a2"
    assert (planned / PLAN_FILE).is_file() and versions(uri) == 0

    run(tmp_path, text, "a3")  # rolls a2 forward first, then appends its own rows
    assert not planned.exists()
    dt = table(uri)
    assert [h.get("cronetl.run_id") for h in dt.history()] == ["a3", "a2", "a1"]
    df = read_pyarrow(uri)
    assert len(df) == 3 * len(expected(tmp_path / "in"))


# --------------------------------------------------------------------------- kill -9


def killed_at_commit(job: Path, run_id: str) -> str:
    """A run in a new process that SIGKILLs itself at the publish point: its commit planned,
    deltalake not called yet."""
    return f"""
import asyncio, os, signal
import etl.write.delta as d
from etl.core.config import load_job
from etl.run.pipeline import RunOptions, run_job
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
d.commit = die
asyncio.run(run_job(load_job({str(job)!r}), RunOptions(run_id={run_id!r}, full_refresh=True)))
"""


def start(cfg: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, RUN_PY, "run", "--config", str(cfg), "--quiet"]
    return subprocess.Popen(cmd, cwd=cfg.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def clean_seconds(cfg: Path) -> float:
    began = time.monotonic()
    proc = start(cfg)
    assert proc.wait(WAIT) in (0, 3)
    return time.monotonic() - began


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_kill_9_at_spread_out_moments_then_the_table_equals_a_clean_runs(tmp_path: Path, mode: str) -> None:
    sources = make_sources(tmp_path / "in", count=4, rows=2000)
    clean = tmp_path / "clean"
    clean.mkdir()
    clean_cfg = clean / "job.toml"
    clean_cfg.write_text(job_toml(sources, str(clean / "table"), mode=mode, chunk_rows=200))
    length = clean_seconds(clean_cfg)
    want = read_pyarrow(str(clean / "table"))

    uri = str(tmp_path / "table")
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(sources, uri, mode=mode, chunk_rows=200))
    rng = random.Random(16)
    outcomes = []
    for k in range(KILL_RUNS):
        proc = start(cfg)
        try:
            proc.wait(length * (k + rng.random()) / KILL_RUNS)  # spread over a clean run's length
            outcomes.append("finished")
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(WAIT)
            outcomes.append("killed")
        # whatever was killed, the table is a committed version or absent: never half a run
        if Path(uri, "_delta_log").is_dir():
            got = read_pyarrow(uri)
            assert got.empty or got.equals(want), outcomes
    assert "killed" in outcomes, outcomes
    final = subprocess.run(
        [sys.executable, RUN_PY, "run", "--config", str(cfg), "--quiet"],
        cwd=cfg.parent,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert final.returncode in (0, 3), (outcomes, final.stderr[-3000:])
    got = read_pyarrow(uri)
    pd.testing.assert_frame_equal(got, want)  # no duplicate rows in append mode either
    pd.testing.assert_frame_equal(read_duckdb(uri), want)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".table.")] == []


# --------------------------------------------------------------------------- s3 (moto)


@pytest.fixture
def s3(tmp_path: Path, bucket: str) -> tuple[str, str, dict[str, str]]:
    """(sources list, table URL, deltalake storage options) on moto's S3 server."""
    from etl.write.delta import delta_options

    make_sources(tmp_path / "in", count=2)
    fs, _ = filesystem(f"s3://{bucket}", key="test")
    for p in sorted((tmp_path / "in").glob("trips-*.csv")):
        fs.put_file(str(p), f"{bucket}/in/{p.name}")
    url = f"s3://{bucket}/table"
    return json.dumps([f"s3://{bucket}/in/trips-*.csv"]), url, delta_options(url)


def test_s3_overwrite_then_append_one_commit_each_read_by_pyarrow_and_polars(
    tmp_path: Path, s3: tuple[str, str, dict[str, str]]
) -> None:
    sources, url, options = s3
    want = expected(tmp_path / "in")
    run(tmp_path, job_toml(sources, url), "o1")
    run(tmp_path, job_toml(sources, url), "o2")
    assert int(table(url, options).version()) == 1
    assert all("/table/o2/" in f for f in table(url, options).file_uris())
    pd.testing.assert_frame_equal(read_pyarrow(url, options), want)
    pd.testing.assert_frame_equal(read_polars(url, options), want)
    run(tmp_path, job_toml(sources, url, mode="append"), "a3")
    assert int(table(url, options).version()) == 2
    both = read_pyarrow(url, options)
    assert len(both) == 2 * len(want)
    pd.testing.assert_frame_equal(both.drop_duplicates(ignore_index=True), want)
    fs, root = filesystem(url, key="test")
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_cronetl_commits") or fs.ls(f"{root}/_cronetl_commits") == []


def test_s3_a_failed_run_commits_nothing_and_deletes_its_files(
    tmp_path: Path, s3: tuple[str, str, dict[str, str]]
) -> None:
    sources, url, options = s3
    run(tmp_path, job_toml(sources, url), "good")
    with pytest.raises(ChecksFailed):
        run(tmp_path, job_toml(sources, url, extra="[checks]\nmin_rows = 1000000"), "checked")
    bad = job_toml(sources, url, mode="append").replace('zone = "int64"', 'zone = "string"')
    with pytest.raises(OutputError, match="column 'zone'"):
        run(tmp_path, bad, "retyped")
    assert int(table(url, options).version()) == 0
    pd.testing.assert_frame_equal(read_pyarrow(url, options), expected(tmp_path / "in"))
    fs, root = filesystem(url, key="test")
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == ["_delta_log", "good"]


def test_s3_a_commit_planned_by_a_killed_run_is_rolled_forward_once(
    tmp_path: Path, s3: tuple[str, str, dict[str, str]]
) -> None:
    sources, url, options = s3
    text = job_toml(sources, url, mode="append")
    run(tmp_path, text, "a1")
    (tmp_path / "job.toml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-c", killed_at_commit(tmp_path / "job.toml", "a2")],
        cwd=ROOT,
        timeout=WAIT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    fs, root = filesystem(url, key="test")
    fs.invalidate_cache()
    assert fs.exists(f"{root}/_cronetl_commits/a2.json") and int(table(url, options).version()) == 0
    run(tmp_path, text, "a3")  # rolls a2 forward, then appends its own rows
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/_cronetl_commits/a2.json")
    assert int(table(url, options).version()) == 2
    assert len(read_pyarrow(url, options)) == 3 * len(expected(tmp_path / "in"))


def test_dry_run_names_the_table_format(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "in", count=1)
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(sources, str(tmp_path / "table")))
    cmd = [sys.executable, RUN_PY, "run", "--config", str(cfg), "--dry-run"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "(mode overwrite, delta)" in proc.stdout
    assert not (tmp_path / "table").exists()


def test_landed_tells_a_made_commit_from_one_not_made_or_unknown(tmp_path: Path) -> None:
    """What publish asks when deltalake raises: is the plan in the table all the same?"""
    from etl.write.delta import _File, _Plan, landed

    sources = make_sources(tmp_path / "in", count=1)
    uri = str(tmp_path / "table")
    run(tmp_path, job_toml(sources, uri), "r1")
    made = [_File(p, 1, 1, {}) for p in table(uri).get_add_actions().column("path").to_pylist()]
    plan = _Plan("r1", "overwrite", ["month"], "{}", made)
    assert landed(uri, {}, plan) is True
    assert landed(uri, {}, _Plan("r2", "overwrite", ["month"], "{}", [_File("r2/x.parquet", 1, 1, {})])) is False
    assert landed(str(tmp_path / "nothing"), {}, plan) is False
    refused = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ALLOW_HTTP": "true", "max_retries": "0"}
    assert landed("s3://no-bucket/table", refused, plan) is None  # the store does not answer

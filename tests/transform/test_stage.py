"""Transform stage under crashed, hung and OOM-killed workers, against a clean serial run.

Workers are real processes, really killed (SIGKILL from the test, or from a ``python``
step on itself). The steps come from a module written into the job folder; they act only
inside a worker process, so the serial reference run of the same job is never touched.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.core.chunks import decode_chunk
from etl.core.config import JobConfig, load_job
from etl.core.errors import WorkerCrashed
from etl.core.records import Chunk, ChunkResult, Source, StagedFile
from etl.read.formats import read_chunks
from etl.run.pipeline import RunOptions, run_job
from etl.transform.executors import ProcessExecutor, ThreadExecutor
from etl.transform.recovery import MIN_SPLIT_ROWS
from etl.transform.worker import WorkerSpec
from tests.conftest import write_trips_csv

ROOT = Path(__file__).resolve().parents[2]

HOOKS = '''
"""Steps that misbehave on purpose, only inside worker processes."""
import multiprocessing, os, signal, threading
from pathlib import Path


def _in_worker():
    return multiprocessing.parent_process() is not None


def _has(df, trip_id):
    return trip_id is not None and bool((df["trip_id"] == str(trip_id)).any())


def note_pid(df, pids):
    """Record every worker (and, as its parent, the forkserver) that runs a chunk."""
    if _in_worker():
        with open(pids, "a") as f:
            f.write(f"{os.getpid()} {os.getppid()}\\n")
    return df


def wait_to_be_killed(df, trip_id, fifo, marker):
    """First time only: send this worker's pid through the FIFO, then wait forever."""
    if _in_worker() and _has(df, trip_id) and not os.path.exists(marker):
        Path(marker).touch()
        with open(fifo, "w") as f:
            f.write(str(os.getpid()))
        threading.Event().wait()
    return df


def kill_self(df, trip_id=None, more_than=None):
    """SIGKILL this worker on the chunk holding trip_id, or on chunks of more rows."""
    if _in_worker() and (_has(df, trip_id) or (more_than is not None and len(df) > more_than)):
        os.kill(os.getpid(), signal.SIGKILL)
    return df


def kill_self_once_both_busy(df, trip_id, fifo):
    """SIGKILL this worker on trip_id's chunk, once hang_and_tell() holds the other worker."""
    if _in_worker() and _has(df, trip_id):
        open(fifo).close()  # opening returns once the hanging step holds the other end
        os.kill(os.getpid(), signal.SIGKILL)
    return df


def hang_and_tell(df, trip_id, fifo):
    if _in_worker() and _has(df, trip_id):
        f = open(fifo, "w")  # kept open: the reader sees no EOF, only that a writer exists
        threading.Event().wait()
    return df


def hang(df, trip_id):
    if _in_worker() and _has(df, trip_id):
        threading.Event().wait()  # nothing ever sets it
    return df
'''


def write_job(
    folder: Path,
    steps: str,
    *,
    executor: str = "process",
    chunk_rows: int = 50,
    out: str = "out",
    extra_transform: str = "",
    sources: str = '["data/trips-*.csv"]',
) -> Path:
    (folder / "misbehave.py").write_text(HOOKS)
    job = folder / f"{out}.toml"
    job.write_text(f"""
[job]
name = "t-{out}"
state_dir = "state"

[sources]
urls = {sources}

[read]
chunk_rows = {chunk_rows}

[transform]
executor = "{executor}"
workers = 2
{extra_transform}
steps = [
  {{op = "python", function = "misbehave:note_pid", params = {{pids = "{folder / "pids.txt"}"}}}},
  {steps}
]

[output]
path = "{out}"
""")
    return job


def run_cli(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(config), "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
    )


def source_rows(folder: Path) -> list[str]:
    """trip_id of every data row of the inputs (the CSV module handles quoted newlines)."""
    ids = []
    for path in sorted(folder.glob("trips-*.csv")):
        with path.open(newline="") as f:
            ids += [row["trip_id"] for row in csv.DictReader(f)]
    return ids


def parts(out: Path) -> dict[str, pa.Table]:
    return {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.rglob("*.parquet"))}


def in_path_order(out: Path) -> pa.Table:
    """All output rows, parts concatenated in name order (= serial row order)."""
    tables = [pq.read_table(p) for p in sorted(out.rglob("*.parquet"))]
    return pa.concat_tables(tables)


def dead_letters(out: Path) -> list[dict[str, object]]:
    """Dead-letter lines, by source and row (files may split a chunk's rows differently)."""
    lines = []
    for p in sorted((out / "_rejected").glob("*.jsonl")):
        lines += [json.loads(line) for line in p.read_text().splitlines()]
    return sorted(lines, key=lambda r: (str(r["source"]), int(r.get("line", r.get("row")))))  # type: ignore[call-overload, arg-type]


def chunk_holding(trips_dir: Path, trip_id: int, name: str = "trips-1.csv", chunk_rows: int = 50) -> Chunk:
    """The chunk of ``name`` the reader hands on with trip ``trip_id`` in it (CSV cut by bytes)."""
    for chunk in chunks_of(trips_dir / name, chunk_rows):
        if str(trip_id) in chunk_ids(chunk, trips_dir):
            return chunk
    raise AssertionError(f"no chunk holds trip {trip_id}")


def chunk_ids(chunk: Chunk, trips_dir: Path) -> list[str]:
    df, _ = decode_chunk(chunk, load_job_for(trips_dir.parent, 50).read, "fail")
    return list(df["trip_id"])


def recorded_pids(folder: Path) -> set[int]:
    text = (folder / "pids.txt").read_text() if (folder / "pids.txt").exists() else ""
    return {int(p) for line in text.splitlines() for p in line.split()}


def worker_pids(folder: Path) -> set[int]:
    return {int(line.split()[0]) for line in (folder / "pids.txt").read_text().splitlines()}


def assert_all_gone(pids: set[int], timeout: float = 10) -> None:
    """Workers and the forkserver exit with the run. A pidfd turns readable when its process
    has exited, zombie or not (this container's init reaps slowly), so this waits, not polls."""
    still = []
    for pid in sorted(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], timeout)[0]:
                still.append((pid, psutil.Process(pid).cmdline()))
        finally:
            os.close(fd)
    assert not still, f"processes left behind: {still}"


def read_pid_from_fifo(fifo: Path, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # never blocks the test if the run died first
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no worker reached the step; run exited with {proc.poll()}"
        return int(os.read(fd, 64).decode())
    finally:
        os.close(fd)


# ------------------------------------------------------------------ killed workers


def test_worker_killed_mid_chunk_is_replaced_and_output_equals_serial(trips_dir: Path) -> None:
    folder = trips_dir.parent
    fifo, marker = folder / "pid.fifo", folder / "blocked-once"
    os.mkfifo(fifo)
    step = (
        f'{{op = "python", function = "misbehave:wait_to_be_killed", '
        f'params = {{trip_id = 10075, fifo = "{fifo}", marker = "{marker}"}}}}'
    )
    serial = write_job(folder, step, executor="serial", out="serial")
    assert run_cli(serial).returncode == 0
    job = write_job(folder, step, out="pooled")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--config", str(job), "--quiet"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = read_pid_from_fifo(fifo, proc)
        assert pid in {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert chunk_holding(trips_dir, 10075).label in stderr and "killed by SIGKILL" in stderr
    serial_parts, pooled_parts = parts(folder / "serial"), parts(folder / "pooled")
    assert list(pooled_parts) == list(serial_parts)
    for name, table in serial_parts.items():
        assert pooled_parts[name].equals(table), name


def test_chunk_that_kills_its_worker_every_time_fails_naming_chunk_and_signal(trips_dir: Path) -> None:
    folder = trips_dir.parent
    step = '{op = "python", function = "misbehave:kill_self", params = {trip_id = 10075}}'
    job = write_job(folder, step, extra_transform="max_attempts = 2")
    proc = run_cli(job)
    assert proc.returncode == 1, proc.stderr
    assert chunk_holding(trips_dir, 10075).label in proc.stderr
    assert "killed by SIGKILL" in proc.stderr and "attempt 2 of transform.max_attempts = 2" in proc.stderr
    assert not (folder / "out").exists()
    assert_all_gone(recorded_pids(folder))


def test_chunk_that_kills_its_worker_every_time_is_quarantined(trips_dir: Path) -> None:
    folder = trips_dir.parent
    step = '{op = "python", function = "misbehave:kill_self", params = {trip_id = 10075}}'
    job = write_job(folder, step, extra_transform='max_attempts = 2\non_error = "quarantine"')
    proc = run_cli(job)
    assert proc.returncode == 3, proc.stderr  # success with rejected rows
    ids = source_rows(trips_dir)
    out_ids = in_path_order(folder / "out").column("trip_id").to_pylist()
    rejected = dead_letters(folder / "out")
    assert len(out_ids) + len(rejected) == len(ids)
    assert sorted(out_ids + [r["raw"]["trip_id"] for r in rejected]) == sorted(ids)  # type: ignore[index]
    assert {r["source"] for r in rejected} == {"trips-1.csv"}
    df, _ = decode_chunk(chunk := chunk_holding(trips_dir, 10075), load_job_for(folder, 50).read, "fail")
    assert [r[chunk.unit] for r in rejected] == list(df.index)  # file lines of the chunk's records
    assert {r["reason"] for r in rejected} == {"worker crashed: killed by SIGKILL after 2 attempts"}


def test_oom_killed_chunk_is_split_in_halves_until_it_fits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = 4 * MIN_SPLIT_ROWS
    write_trips_csv(data / "trips-0.csv", rows=rows, seed=7)
    # Kills every piece of more than 1.5 × MIN_SPLIT_ROWS rows: the chunk, then both halves.
    step = f'{{op = "python", function = "misbehave:kill_self", params = {{more_than = {MIN_SPLIT_ROWS * 3 // 2}}}}}'
    # One chunk for the whole file (its records span more lines than rows: quoted newlines).
    serial = write_job(tmp_path, step, executor="serial", chunk_rows=2 * rows, out="serial")
    pooled = write_job(tmp_path, step, chunk_rows=2 * rows, out="pooled", extra_transform="max_attempts = 1")
    assert run_cli(serial).returncode == 0
    proc = run_cli(pooled)
    assert proc.returncode == 0, proc.stderr
    assert "retrying as two halves" in proc.stderr
    names = sorted(p.name for p in (tmp_path / "pooled").rglob("*.parquet"))
    assert names == ["part-00000.parquet"]  # the halves' pieces are cut into one file, in order
    assert in_path_order(tmp_path / "pooled").equals(in_path_order(tmp_path / "serial"))


HANG_TIMEOUT_S = 5


def test_hung_chunk_is_killed_at_the_timeout_and_fails_the_run(trips_dir: Path) -> None:
    folder = trips_dir.parent
    step = '{op = "python", function = "misbehave:hang", params = {trip_id = 10075}}'
    # 5 s: far above a 50-row chunk's time on a loaded machine, and only the hung chunk waits it out
    job = write_job(folder, step, extra_transform=f"chunk_timeout = {HANG_TIMEOUT_S}\nmax_attempts = 2")
    proc = run_cli(job)
    assert proc.returncode == 1, proc.stderr
    assert chunk_holding(trips_dir, 10075).label in proc.stderr
    assert f"transform.chunk_timeout = {HANG_TIMEOUT_S:.1f}s" in proc.stderr
    assert "attempt 2 of transform.max_attempts = 2" in proc.stderr
    assert_all_gone(recorded_pids(folder))


# ------------------------------------------------------------ executor, in-process


def test_failed_run_stops_every_worker_it_started(trips_dir: Path) -> None:
    """In this process (the CLI's exit would hide a leak: daemonic workers are stopped at exit)."""
    folder = trips_dir.parent
    fifo = folder / "busy.fifo"
    os.mkfifo(fifo)
    steps = (
        f'{{op = "python", function = "misbehave:hang_and_tell", params = {{trip_id = 20075, fifo = "{fifo}"}}}},'
        f'{{op = "python", function = "misbehave:kill_self_once_both_busy", '
        f'params = {{trip_id = 75, fifo = "{fifo}"}}}},'
    )
    job = write_job(
        folder, steps, out="leak", extra_transform="max_attempts = 1", sources=f'["{trips_dir}/trips-*.csv"]'
    )
    # The run measures this process's tree, pytest included (600+ MiB late in a suite): under
    # the default budget the memory guard would hold the second chunk back, and the first
    # would wait for it forever.
    roomy = load_job(job, ['resources.memory_limit="64GiB"'])
    with pytest.raises(WorkerCrashed, match="killed by SIGKILL"):
        asyncio.run(run_job(roomy, RunOptions(run_id="leak")))
    workers = worker_pids(folder)
    assert len(workers) >= 2  # the hanging one and the killed one at least
    assert_all_gone(workers)


def chunks_of(path: Path, chunk_rows: int) -> list[Chunk]:
    cfg = load_job_for(path.parent, chunk_rows)
    source = Source(index=0, url=str(path), name=path.name, format="csv")
    return list(read_chunks(StagedFile(source, path, path.stat().st_size), cfg.read))


def load_job_for(folder: Path, chunk_rows: int, step: str = "") -> JobConfig:
    job = write_job(folder, step, chunk_rows=chunk_rows, out="x", sources=f'["{folder}/data/trips-*.csv"]')
    return load_job(job)


def test_an_idle_workers_death_is_replaced_without_touching_a_chunk(trips_dir: Path) -> None:
    folder = trips_dir.parent
    cfg = load_job_for(folder, 100)
    spec = WorkerSpec(cfg.transform, cfg.output, cfg.read)
    chunks = chunks_of(trips_dir / "trips-0.csv", 100)

    async def go() -> tuple[list[ChunkResult], list[ChunkResult]]:
        pooled = ProcessExecutor(spec, 1, None)
        try:
            first = [await pooled.run(chunks[0])]
            (pid,) = worker_pids(folder)
            os.kill(pid, signal.SIGKILL)  # the only worker, while it runs nothing (pebble's pool broke here)
            psutil.Process(pid).wait(10)
            rest = [await pooled.run(c) for c in chunks[1:]]
        finally:
            pooled.close()
        serial = ThreadExecutor(spec, 1)
        try:
            expected = [await serial.run(c) for c in chunks]
        finally:
            serial.close()
        return first + rest, expected

    got, expected = asyncio.run(go())
    assert [[(p.relpath, p.data) for p in r.parts] for r in got] == [
        [(p.relpath, p.data) for p in r.parts] for r in expected
    ]


def test_ipc_bytes_are_counted_exactly(trips_dir: Path) -> None:
    folder = trips_dir.parent
    cfg = load_job_for(folder, 60)
    summary = asyncio.run(run_job(cfg, RunOptions(run_id="ipc")))
    sent = sum(c.nbytes for f in sorted(trips_dir.glob("trips-*.csv")) for c in chunks_of(f, 60))
    written = summary.stats["stages"]["write"]["bytes_out"]  # the workers' pieces, as the writer took them
    t = summary.transform
    # Rows come back as files the workers wrote into the writer's folder, not through the pipe.
    assert (t["ipc_bytes_sent"], t["ipc_bytes_received"]) == (sent, 0)
    assert written > sent // 2
    assert 0 <= t["ipc_share"] <= 1 and t["ipc_seconds"] >= 0
    assert set(t) >= {"decode_seconds", "steps_seconds", "encode_seconds", "worker_seconds"}


# ------------------------------------------------------------------ property test

PROPERTY_STEPS = """{op = "cast", columns = {passengers = "Int64", fare = "float64", zone = "int64"}},
  {op = "filter", expr = "fare > 0"},
  {op = "derive", columns = {fare_per_passenger = "fare / passengers"}},"""


@pytest.fixture(scope="module")
def property_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data and a serial, whole-file-chunk reference output beside it (``ref``)."""
    folder = tmp_path_factory.mktemp("property")
    data = folder / "data"
    data.mkdir()
    for k in range(2):
        write_trips_csv(data / f"trips-{k}.csv", rows=PROPERTY_ROWS[k], seed=k, start_id=10_000 * k)
    reference = write_job(
        folder,
        PROPERTY_STEPS,
        executor="serial",
        chunk_rows=100_000,
        out="ref",
        extra_transform='on_error = "quarantine"',
    )
    asyncio.run(run_job(load_job(reference), RunOptions(run_id="ref")))
    return folder


PROPERTY_ROWS = (300, 341)


def published_bytes(out: Path) -> dict[str, bytes]:
    """Every published file, by its path under the output folder."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunk_rows=st.integers(7, 400), workers=st.integers(1, 3), executor=st.sampled_from(["serial", "thread", "process"])
)
def test_any_chunk_size_worker_count_and_executor_equals_serial(
    property_job: Path, chunk_rows: int, workers: int, executor: str
) -> None:
    """Each example runs in a fresh folder (its own state: nothing is skipped as unchanged).
    Same chunk size: the published bytes equal a serial run's. Any chunk size: the same rows,
    in the same order, and the same dead letters as the whole-file reference."""
    ex = Path(tempfile.mkdtemp(dir=property_job))
    sources = f'["{property_job}/data/trips-*.csv"]'
    extra = 'on_error = "quarantine"'
    serial = write_job(
        ex,
        PROPERTY_STEPS,
        executor="serial",
        chunk_rows=chunk_rows,
        out="serial",
        extra_transform=extra,
        sources=sources,
    )
    pooled = write_job(
        ex, PROPERTY_STEPS, executor=executor, chunk_rows=chunk_rows, out="any", extra_transform=extra, sources=sources
    )
    want = asyncio.run(run_job(load_job(serial), RunOptions(run_id="serial")))
    got = asyncio.run(run_job(load_job(pooled, [f"transform.workers={workers}"]), RunOptions(run_id="any")))
    assert got.rows_in == want.rows_in == sum(PROPERTY_ROWS) and got.chunks == want.chunks > 0
    assert published_bytes(ex / "any") == published_bytes(ex / "serial")
    assert in_path_order(ex / "any").equals(in_path_order(property_job / "ref"))
    assert dead_letters(ex / "any") == dead_letters(property_job / "ref")

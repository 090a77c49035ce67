"""etl.transform.executors: thread and process executors on real chunks, real worker processes."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing.forkserver
import os
import random
import signal
import struct
import subprocess
import sys
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pytest

from etl.core.config import JobConfig, load_job
from etl.core.errors import ChunkTimeout, ETLError, ExitCode, StepError, WorkerCrashed
from etl.core.parts import ipc_to_table
from etl.core.records import Chunk, ChunkResult, Source, StagedFile
from etl.read.formats import read_chunks
from etl.transform.executors import (
    MAX_NAMED_CHUNKS,
    Executor,
    IpcStats,
    ProcessExecutor,
    ThreadExecutor,
    TransformStats,
    describe_exit,
)
from etl.transform.recovery import ChunkRunner
from etl.transform.worker import READY, WorkerSpec, serve
from tests.conftest import write_trips_csv

HOOK_MODULE = "executor_contract_hooks"  # unique: python steps are imported once per process

HOOKS = '''
"""Python steps for tests/transform/test_executors.py; the harmful ones act only in workers."""
import multiprocessing, os, signal, threading


def _in_worker():
    return multiprocessing.parent_process() is not None


def kill_self(df):
    if _in_worker():
        os.kill(os.getpid(), signal.SIGKILL)
    return df


def exit_now(df, code):
    if _in_worker():
        os._exit(code)
    return df


def hang(df):
    if _in_worker():
        threading.Event().wait()
    return df


def explode(df):
    raise ValueError("exploded on purpose")


def kill_on(df, trip_id):
    if _in_worker() and (df["trip_id"] == trip_id).any():
        os.kill(os.getpid(), signal.SIGKILL)
    return df


def pid(df):
    df["pid"] = str(os.getpid())
    return df


def slow_on(df, trip_id, seconds):
    if trip_id == "*" or (df["trip_id"] == trip_id).any():
        threading.Event().wait(seconds)
    return df


RELEASE = threading.Event()


def block_on(df, trip_id):
    """Blocks on the chunk holding trip_id until RELEASE is set: in a run's process, for good."""
    if (df["trip_id"] == trip_id).any():
        RELEASE.wait()
    return df
'''

STEPS = """
  {op = "cast", columns = {trip_id = "int64", distance = "float64", fare = "float64"}},
  {op = "filter", expr = "distance > 3"},
  {op = "derive", columns = {per_mile = "fare / distance"}},
"""


def make_job(
    folder: Path, steps: str = STEPS, *, executor: str = "process", read: str = "chunk_rows = 80"
) -> JobConfig:
    (folder / f"{HOOK_MODULE}.py").write_text(HOOKS)
    job = folder / f"job-{executor}.toml"
    job.write_text(f"""
[job]
name = "executor-test"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[read]
{read}

[transform]
executor = "{executor}"
workers = 2
steps = [
{steps}
]

[output]
path = "out"
""")
    return load_job(job)


def spec_of(cfg: JobConfig) -> WorkerSpec:
    return WorkerSpec(cfg.transform, cfg.output, cfg.read)


def chunks_of(path: Path, cfg: JobConfig) -> list[Chunk]:
    source = Source(0, str(path), path.name, "csv")
    return list(read_chunks(StagedFile(source, path, path.stat().st_size), cfg.read))


def hook_step(name: str, params: str = "") -> str:
    extra = f", params = {{{params}}}" if params else ""
    return f'{{op = "python", function = "{HOOK_MODULE}:{name}"{extra}}},'


@pytest.fixture
def trips(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "trips.csv"
    write_trips_csv(path, rows=400, seed=9)
    return path


def part_bytes(results: list[ChunkResult]) -> list[list[tuple[str, bytes, int]]]:
    return [[(p.relpath, p.data, p.rows) for p in r.parts] for r in results]


async def run_all(executor: Executor, chunks: list[Chunk]) -> list[ChunkResult]:
    return list(await asyncio.gather(*(executor.run(c) for c in chunks)))


# --------------------------------------------------------------- same output anywhere


@pytest.mark.parametrize("read", ["chunk_rows = 80", 'chunk_rows = 80\nparse = "reader"'])
async def test_thread_and_process_executors_give_the_same_parts(tmp_path: Path, trips: Path, read: str) -> None:
    cfg = make_job(tmp_path, read=read)
    chunks = chunks_of(trips, cfg)
    assert len(chunks) >= 4
    threads = ThreadExecutor(spec_of(cfg), 2)
    try:
        by_thread = await run_all(threads, chunks)
    finally:
        threads.close()
    processes = ProcessExecutor(spec_of(cfg), 2, None)
    try:
        by_process = await run_all(processes, chunks)
    finally:
        processes.close()
    assert part_bytes(by_process) == part_bytes(by_thread)
    for a, b in zip(by_thread, by_process):
        assert (a.source_index, a.index, a.rows_in, a.rows_out, a.rows_rejected) == (
            b.source_index,
            b.index,
            b.rows_in,
            b.rows_out,
            b.rows_rejected,
        )
    assert threads.workers == processes.workers == 2


async def test_process_executor_runs_chunks_in_other_processes(tmp_path: Path, trips: Path) -> None:
    import os

    cfg = make_job(tmp_path, hook_step("pid"))
    chunks = chunks_of(trips, cfg)
    ex = ProcessExecutor(spec_of(cfg), 2, None)
    try:
        results = await run_all(ex, chunks)
    finally:
        ex.close()
    pids = {pid for r in results for p in r.parts for pid in ipc_to_table(p.data).column("pid").to_pylist()}
    assert pids and str(os.getpid()) not in pids
    assert len(pids) <= 2  # the pool's two workers


# ---------------------------------------------------------------------- failures


async def test_worker_that_kills_itself_is_worker_crashed_naming_sigkill(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, hook_step("kill_self"))
    chunk = chunks_of(trips, cfg)[1]
    ex = ProcessExecutor(spec_of(cfg), 1, None)
    try:
        with pytest.raises(WorkerCrashed) as info:
            await ex.run(chunk)
    finally:
        ex.close()
    err = info.value
    assert not isinstance(err, ChunkTimeout)
    assert "SIGKILL" in str(err)
    assert "killed by SIGKILL" in err.message
    assert err.item == chunk.label
    assert err.retryable


async def test_pool_keeps_working_after_a_worker_died(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, hook_step("kill_on", 'trip_id = "5"'))
    chunks = chunks_of(trips, cfg)
    ex = ProcessExecutor(spec_of(cfg), 1, None)
    try:
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            await ex.run(chunks[0])  # holds trip 5: its only worker dies
        rest = [await ex.run(c) for c in chunks[1:]]  # a new worker takes the next chunks
    finally:
        ex.close()
    assert [r.index for r in rest] == [c.index for c in chunks[1:]]
    assert all(r.rows_out == r.rows_in for r in rest)


async def test_worker_that_exits_names_the_exit_code(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, hook_step("exit_now", "code = 7"))
    chunk = chunks_of(trips, cfg)[0]
    ex = ProcessExecutor(spec_of(cfg), 1, None)
    try:
        with pytest.raises(WorkerCrashed, match="exit code 7") as info:
            await ex.run(chunk)
    finally:
        ex.close()
    assert info.value.item == chunk.label


async def test_hung_worker_past_the_timeout_is_chunk_timeout(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, hook_step("hang"))
    chunk = chunks_of(trips, cfg)[0]
    ex = ProcessExecutor(spec_of(cfg), 1, 1.0)
    try:
        with pytest.raises(ChunkTimeout, match="chunk_timeout") as info:
            await ex.run(chunk)
    finally:
        ex.close()
    assert isinstance(info.value, WorkerCrashed) and info.value.item == chunk.label


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_failing_step_is_a_step_error_from_either_executor(tmp_path: Path, trips: Path, kind: str) -> None:
    cfg = make_job(tmp_path, hook_step("explode"))
    chunk = chunks_of(trips, cfg)[2]
    ex: Executor = ThreadExecutor(spec_of(cfg), 1) if kind == "thread" else ProcessExecutor(spec_of(cfg), 1, None)
    try:
        with pytest.raises(StepError, match="exploded on purpose") as info:
            await ex.run(chunk)
    finally:
        ex.close()
    assert info.value.item == chunk.label
    if kind == "process":  # the worker's traceback travels as the cause
        assert "exploded on purpose" in str(info.value.__cause__)


# ------------------------------------------------------------------- describe_exit


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (-signal.SIGKILL, "killed by SIGKILL"),
        (-signal.SIGTERM, "killed by SIGTERM"),
        (-signal.SIGSEGV, "killed by SIGSEGV"),
        (-250, "killed by signal 250"),
        (0, "exit code 0"),
        (1, "exit code 1"),
        (137, "exit code 137"),
        (None, "exit code None"),
    ],
)
def test_describe_exit(code: int | None, text: str) -> None:
    assert describe_exit(code) == text


# ------------------------------------------------------------------------- IPC stats


async def test_process_executor_counts_ipc_bytes(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path)
    chunks = chunks_of(trips, cfg)
    ex = ProcessExecutor(spec_of(cfg), 2, None)
    try:
        assert ex.ipc_stats().bytes_sent == 0 and ex.ipc_stats().bytes_received == 0
        results = await run_all(ex, chunks)
        stats = ex.ipc_stats()
    finally:
        ex.close()
    assert stats.bytes_sent == sum(c.nbytes for c in chunks)
    assert stats.bytes_received == sum(r.nbytes for r in results) > 0
    assert stats.seconds >= 0


async def test_thread_executor_moves_no_bytes_between_processes(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path)
    ex = ThreadExecutor(spec_of(cfg), 2)
    try:
        await run_all(ex, chunks_of(trips, cfg))
        assert ex.ipc_stats() == IpcStats()
    finally:
        ex.close()


def test_transform_stats_add_sums_result_counters() -> None:
    stats = TransformStats()
    stats.add(ChunkResult(0, 0, rows_in=10, rows_out=7, rows_rejected=3, seconds=0.5, decode_seconds=0.1))
    stats.add(ChunkResult(0, 1, rows_in=5, rows_out=5, seconds=0.25, steps_seconds=0.2))
    assert (stats.rows_in, stats.rows_out, stats.rows_rejected) == (15, 12, 3)
    assert stats.worker_seconds == 0.75 and stats.decode_seconds == 0.1 and stats.steps_seconds == 0.2
    assert stats.chunks == 0  # counted by the stage, not by add()
    assert stats.as_dict()["worker_seconds"] == 0.75


# ------------------------------------------------- killed at any moment (issue 21)
#
# Each case runs a few times (the full 50-run loop is benchmarks/fault_loop.py). A hang
# would fail the test at HANG_GUARD, not wait forever; the output must equal the serial
# run's rows, and only the killed worker's chunk may be retried.

HANG_GUARD = 60.0  # seconds: far above a run's few seconds; only a hang reaches it
ROUNDS = 3


class DyingConn:
    """A worker's pipe that SIGKILLs its process in the middle of a message."""

    def __init__(self, conn: Connection, moment: str) -> None:
        self.conn, self.moment = conn, moment

    def send(self, obj: Any) -> None:
        if self.moment == "send" and obj != READY:  # half the reply's frame written, then death
            buf = bytes(ForkingPickler.dumps(obj))
            os.write(self.conn.fileno(), struct.pack("!i", len(buf)) + buf[: len(buf) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        self.conn.send(obj)

    def recv(self) -> Any:
        if self.moment == "receive":  # 1 KiB of a chunk of >64 KiB: the parent is still writing
            os.read(self.conn.fileno(), 1024)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.conn.recv()

    def fileno(self) -> int:  # a chunk's data is read from the pipe itself
        return self.conn.fileno()


def serve_dying(conn: Connection, spec: WorkerSpec, *, marker: str, moment: str) -> None:
    """``serve``, but the first worker to claim ``marker`` dies at ``moment`` of its first chunk."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        serve(conn, spec)
    else:
        serve(DyingConn(conn, moment), spec)  # type: ignore[arg-type]  # duck-typed pipe


@pytest.fixture
def big_trips(tmp_path: Path) -> Path:
    """Chunks of 2,500 rows (~170 KB): larger than a pipe's buffer, and big enough to halve."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "trips.csv"
    write_trips_csv(path, rows=10_000, seed=21)
    return path


def rows_of(results: list[ChunkResult]) -> pa.Table:
    """Every part's rows in part-name order: the published dataset's order."""
    parts = sorted((p.relpath, p.data) for r in results for p in r.parts)
    return pa.concat_tables(ipc_to_table(data) for _, data in parts)


async def serial_results(cfg: JobConfig, chunks: list[Chunk]) -> list[ChunkResult]:
    ex = ThreadExecutor(spec_of(cfg), 1)
    try:
        return [await ex.run(c) for c in chunks]
    finally:
        ex.close()


async def run_through_recovery(
    ex: ProcessExecutor, cfg: JobConfig, chunks: list[Chunk], during: Any = None
) -> tuple[list[ChunkResult], TransformStats]:
    """Every chunk through the recovery runner (retries, halves), as the stage does;
    ``during`` (a coroutine function) runs once the chunks are submitted."""
    stats = TransformStats()
    runner = ChunkRunner(ex, cfg.transform, stats, cfg.read)
    try:
        work = asyncio.gather(*(runner.run(c) for c in chunks))
        if during is not None:
            await during()
        return list(await asyncio.wait_for(work, HANG_GUARD)), stats
    finally:
        ex.close()


@pytest.mark.parametrize("moment", ["receive", "send"])
async def test_worker_killed_while_receiving_or_sending_fails_only_its_own_chunk(
    tmp_path: Path, big_trips: Path, moment: str
) -> None:
    cfg = make_job(tmp_path, read="chunk_rows = 2500")
    chunks = chunks_of(big_trips, cfg)
    assert len(chunks) >= 4 and min(c.nbytes for c in chunks[:2]) > 64 * 1024  # the first two go out first
    expected = rows_of(await serial_results(cfg, chunks))
    for n in range(ROUNDS):
        marker = tmp_path / f"died-{moment}-{n}"
        dying = functools.partial(serve_dying, marker=str(marker), moment=moment)
        results, stats = await run_through_recovery(ProcessExecutor(spec_of(cfg), 2, None, serve=dying), cfg, chunks)
        assert marker.exists()  # a worker did die at that moment
        assert (stats.splits, stats.retries) == (1, 0)  # its chunk alone, halved as after any SIGKILL
        assert rows_of(results).equals(expected)


async def test_worker_killed_while_idle_costs_no_attempt(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path)
    chunks = chunks_of(trips, cfg)
    expected = part_bytes(await serial_results(cfg, chunks))
    for _ in range(ROUNDS):
        ex = ProcessExecutor(spec_of(cfg), 2, None)

        async def kill_an_idle_worker(ex: ProcessExecutor = ex) -> None:
            pid = ex.worker_pids()[0]  # both idle: one chunk ran and returned
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(psutil.Process(pid).wait, 10)

        first, _ = await run_through_recovery_keep_open(ex, cfg, chunks[:1])
        await kill_an_idle_worker()
        rest, stats = await run_through_recovery(ex, cfg, chunks[1:])
        assert (stats.splits, stats.retries) == (0, 0)
        assert part_bytes(first + rest) == expected  # byte for byte: nothing was retried


async def run_through_recovery_keep_open(
    ex: ProcessExecutor, cfg: JobConfig, chunks: list[Chunk]
) -> tuple[list[ChunkResult], TransformStats]:
    stats = TransformStats()
    runner = ChunkRunner(ex, cfg.transform, stats, cfg.read)
    return list(await asyncio.wait_for(asyncio.gather(*(runner.run(c) for c in chunks)), HANG_GUARD)), stats


def fork_server_pid() -> int | None:
    return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]  # the module's singleton


async def test_fork_server_killed_mid_run_neither_stalls_nor_loses_a_chunk(tmp_path: Path, big_trips: Path) -> None:
    cfg = make_job(tmp_path, read="chunk_rows = 1000")
    chunks = chunks_of(big_trips, cfg)
    expected = rows_of(await serial_results(cfg, chunks))
    rng = random.Random(21)
    for _ in range(ROUNDS):
        ex = ProcessExecutor(spec_of(cfg), 2, None)

        async def kill_fork_server_then_a_worker(ex: ProcessExecutor = ex) -> None:
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # a random moment of the run
            server = fork_server_pid()
            if server is not None:
                os.kill(server, signal.SIGKILL)
            for pid in ex.worker_pids()[:1]:  # its replacement needs a new fork server
                os.kill(pid, signal.SIGKILL)

        results, _ = await run_through_recovery(ex, cfg, chunks, kill_fork_server_then_a_worker)
        assert rows_of(results).equals(expected)
        assert fork_server_pid() is not None


async def test_two_workers_killed_at_once_at_random_moments(tmp_path: Path, big_trips: Path) -> None:
    cfg = make_job(tmp_path, read="chunk_rows = 1000")
    chunks = chunks_of(big_trips, cfg)
    expected = rows_of(await serial_results(cfg, chunks))
    rng = random.Random(2)
    for _ in range(ROUNDS):
        ex = ProcessExecutor(spec_of(cfg), 2, None)

        async def kill_both(ex: ProcessExecutor = ex) -> None:
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            for pid in ex.worker_pids():
                os.kill(pid, signal.SIGKILL)

        results, _ = await run_through_recovery(ex, cfg, chunks, kill_both)
        assert rows_of(results).equals(expected)


# ------------------------------------- a pool that cannot start workers (issue 21, item 3)

POISON_MODULE = "forkserver_poison_for_executor_tests"  # preloaded by the fork server


def poison_source(marker: Path) -> str:
    return f'''
"""Preloaded by every new fork server: while the marker exists, it SIGKILLs itself on start."""
import os, signal
if os.path.exists({str(marker)!r}):
    os.kill(os.getpid(), signal.SIGKILL)
'''


async def test_a_pool_that_cannot_start_workers_fails_every_chunk_naming_them_all(
    tmp_path: Path, trips: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork server is SIGKILLed, and so is every one started after it: no worker can
    start. Every chunk queued or in flight fails with one error naming them all (the first
    MAX_NAMED_CHUNKS, then a count), exit 1; none waits, and the next chunk fails at once."""
    cfg = make_job(tmp_path, read="chunk_rows = 20")
    chunks = chunks_of(trips, cfg)
    assert len(chunks) > MAX_NAMED_CHUNKS
    marker = tmp_path / "poisoned"
    (tmp_path / f"{POISON_MODULE}.py").write_text(poison_source(marker))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the fork server's own sys.path
    try:
        for _ in range(ROUNDS):
            ex = ProcessExecutor(spec_of(cfg), 2, None)
            try:
                await asyncio.wait_for(run_all(ex, chunks[:1]), HANG_GUARD)  # both workers up
                marker.touch()
                ex._ctx.set_forkserver_preload(["etl.transform.worker", POISON_MODULE])
                server = fork_server_pid()
                assert server is not None
                os.kill(server, signal.SIGKILL)  # and each new one kills itself as it starts
                for pid in ex.worker_pids():  # so the next chunks need new workers
                    os.kill(pid, signal.SIGKILL)
                    await asyncio.to_thread(psutil.Process(pid).wait, 10)
                stats = TransformStats()
                runner = ChunkRunner(ex, cfg.transform, stats, cfg.read)
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*(runner.run(c) for c in chunks), return_exceptions=True), HANG_GUARD
                )
                with pytest.raises(ETLError) as later:
                    await ex.run(chunks[0])  # a broken pool fails a new chunk at once
            finally:
                ex.close()
                marker.unlink(missing_ok=True)
            errors = {id(e): e for e in outcomes if isinstance(e, BaseException)}
            assert len(errors) == 1 and len(outcomes) == len(chunks)  # every chunk, one error
            (error,) = errors.values()
            assert later.value is error
            assert isinstance(error, ETLError) and not isinstance(error, WorkerCrashed)  # no retry can help
            assert error.exit_code == ExitCode.FAILED and error.stage == "transform"
            text = str(error)
            assert "died while starting" in text and "the pool cannot start workers" in text
            assert f"{len(chunks)} chunks queued or in flight could not be resubmitted" in text
            assert all(c.label in text for c in chunks[:MAX_NAMED_CHUNKS])
            assert chunks[MAX_NAMED_CHUNKS].label not in text
            assert text.endswith(f"and {len(chunks) - MAX_NAMED_CHUNKS} more")
            assert stats.retries == stats.splits == 0
    finally:
        multiprocessing.forkserver.set_forkserver_preload(["etl.transform.worker"])
    fresh = ProcessExecutor(spec_of(cfg), 1, None)  # the next pool starts a healthy fork server
    try:
        assert (await asyncio.wait_for(fresh.run(chunks[0]), HANG_GUARD)).rows_out > 0
    finally:
        fresh.close()


# ----------------------------------------------- the thread executor's watchdog, end to end


def test_thread_executor_a_slow_chunk_is_no_stall_the_watchdog_leaves_it(tmp_path: Path, trips: Path) -> None:
    """A whole run on threads with ``stall_timeout`` far below one chunk's time: the
    watchdog sees the quiet stretch but a thread is on the chunk (``busy()``), so it never
    resubmits it; the output equals the serial run's."""
    from etl.run.pipeline import RunOptions, run_job

    slow = hook_step("slow_on", 'trip_id = "5", seconds = 1.5')
    base = make_job(tmp_path, slow + STEPS, executor="thread")
    path = tmp_path / "job-thread.toml"
    runs = {}
    for executor, out in (("serial", "out-serial"), ("thread", "out-thread")):
        cfg = load_job(
            path,
            [
                f"transform.executor={executor}",
                "transform.workers=1",
                "transform.stall_timeout=0.3",
                f"output.path={out}",
            ],
        )
        runs[executor] = asyncio.run(asyncio.wait_for(run_job(cfg, RunOptions(full_refresh=True)), HANG_GUARD))
    stats = runs["thread"].transform
    assert base.transform.executor == "thread"
    assert stats["longest_quiet_seconds"] >= 1.0  # three stall periods with the chunk in flight
    assert stats["stalls"] == 0 and stats["retries"] == 0
    assert published(tmp_path / "out-thread") == published(tmp_path / "out-serial")


def published(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------- the thread executor's chunk_timeout (issue 21)
#
# A thread cannot be killed: a chunk past chunk_timeout fails the run at once (not retried,
# not set aside) and its thread is left behind, so the process still exits.

BLOCKED_TRIP = "250"  # in chunk 3 of trips.csv at chunk_rows = 80


def hook_module() -> Any:
    import importlib

    return importlib.import_module(HOOK_MODULE)  # the executor's init_worker put its folder on sys.path


@pytest.mark.parametrize("on_error", ["fail", "quarantine"])
async def test_thread_executor_chunk_past_the_timeout_fails_at_once_and_close_does_not_wait(
    tmp_path: Path, trips: Path, on_error: str
) -> None:
    make_job(tmp_path, hook_step("block_on", f'trip_id = "{BLOCKED_TRIP}"') + STEPS, executor="thread")
    cfg = load_job(tmp_path / "job-thread.toml", [f"transform.on_error={on_error}"])
    chunks = chunks_of(trips, cfg)
    ex = ThreadExecutor(spec_of(cfg), 2, 0.5)
    hooks = hook_module()
    try:
        runner = ChunkRunner(ex, cfg.transform, TransformStats(), cfg.read)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(runner.run(c) for c in chunks), return_exceptions=True), HANG_GUARD
        )
        blocked = [c for c, o in zip(chunks, outcomes, strict=True) if isinstance(o, BaseException)]
        assert len(blocked) == 1  # every other chunk has its result
        error = outcomes[chunks.index(blocked[0])]
        assert isinstance(error, ChunkTimeout) and not error.retryable
        assert error.item == blocked[0].label and error.attempts == 1  # not retried, not set aside
        assert "thread executor cannot interrupt" in error.message and 'executor = "process"' in error.message
        assert ex.busy() == 1  # the thread is still on it
        await asyncio.wait_for(asyncio.to_thread(ex.close), HANG_GUARD)  # returns with the thread left behind
    finally:
        hooks.RELEASE.set()  # let the left-behind thread end, for the next tests
        ex.close()
    for thread in ex._threads:
        thread.join(HANG_GUARD)
    hooks.RELEASE.clear()


async def test_thread_executor_timeout_starts_when_a_thread_takes_the_chunk(tmp_path: Path, trips: Path) -> None:
    """One thread, 5 chunks of 0.4 s each: each runs well within chunk_timeout = 1.5 s, so
    none times out, though the last one ends 2 s after it was submitted."""
    cfg = make_job(tmp_path, hook_step("slow_on", "trip_id = TRIP, seconds = 0.4").replace("TRIP", '"*"') + STEPS)
    chunks = chunks_of(trips, cfg)
    assert len(chunks) >= 5
    ex = ThreadExecutor(spec_of(cfg), 1, 1.5)
    try:
        results = await asyncio.wait_for(run_all(ex, chunks), HANG_GUARD)
    finally:
        ex.close()
    assert sum(r.rows_in for r in results) == 400


def test_thread_run_past_chunk_timeout_exits_1_naming_the_chunk_and_the_process_ends(
    tmp_path: Path, trips: Path
) -> None:
    """A real ``run.py`` on threads whose step blocks for good on one chunk: it exits 1
    within seconds (not waiting for the thread), the error names the chunk and says why it
    was not retried, and the output of the run before is untouched. 3 runs."""
    ok = make_job(tmp_path, executor="serial")
    blocked = make_job(tmp_path, hook_step("block_on", f'trip_id = "{BLOCKED_TRIP}"') + STEPS, executor="thread")
    assert ok.output.path == blocked.output.path
    chunk = next(c for c in chunks_of(trips, blocked) if f"\n{BLOCKED_TRIP},".encode() in c.data)
    root = Path(__file__).resolve().parents[2]

    def run(job: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(root / "run.py"), "--config", str(tmp_path / job), "--quiet", *extra],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,  # a hang fails the test here
            stdin=subprocess.DEVNULL,
            check=False,
        )

    first = run("job-serial.toml")
    assert first.returncode == ExitCode.OK, first.stderr
    before = published(tmp_path / "out")
    assert before
    for _ in range(ROUNDS):
        proc = run("job-thread.toml", "--set", "transform.chunk_timeout=1", "--set", "transform.max_attempts=3")
        assert proc.returncode == ExitCode.FAILED, proc.stderr
        assert chunk.label in proc.stderr  # source file, chunk number, lines
        assert "chunk_timeout = 1.0s" in proc.stderr and "thread executor cannot interrupt" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert "retrying" not in proc.stderr  # not retried
        assert published(tmp_path / "out") == before

"""Transform stage: run the job's steps on every chunk, on the executor that fits the work.

Queues and flow::

    chunks queue ──► dispatcher ──► executor.run(chunk) ──► results queue
    (BoundedQueue,    (event loop)   serial │ thread │ process │ dask     (BoundedQueue,
     closed by the                   at most `in_flight` chunks          closed by the
     read stage)                     submitted at once                   dispatcher)

* **In**: ``Chunk`` records (Arrow IPC bytes or raw CSV text, + identity) from the chunks queue.
* **Out**: one ``ChunkResult`` per chunk (a chunk split in halves, see below, still gives
  one: the halves' results are merged), with encoded output parts, rejected rows and
  metrics, put on the results queue in completion order; part names carry source and
  chunk index, so the published output is the same whatever the order.
* **Bound**: a semaphore of ``in_flight`` permits: a chunk is taken from the queue only when
  a permit is free, so a slow pool pushes back on the readers.
* **End of stream**: when the chunks queue is drained and every in-flight chunk has
  returned, the dispatcher closes the results queue.
* **Crossing the process boundary**: only plain data. The ``WorkerSpec`` (validated
  transform and output config) goes once per worker through the pool's initializer; then
  a ``Chunk`` goes in and a ``ChunkResult`` comes out. CSV parsing (``read.parse =
  "worker"``), the steps and the output encoding (Parquet compression included) all run
  in the worker, off the parent's cores.

Inter-process cost (issue 4). CSV chunks travel as raw text cut at record ends (the
reader threads only decompress and cut; the worker parses, ``etl.read.csv_cut``), JSON Lines
and Parquet chunks as uncompressed Arrow IPC stream bytes (decoded zero-copy), and parts
come back already Parquet-encoded and compressed, so each direction pickles one large
``bytes`` object: a memcpy plus a pipe write, no per-row work in the parent. It is
measured in every run: ``TransformStats.ipc_seconds`` is the CPU time of the pool's three
threads in the parent (they pickle and send tasks, receive and unpickle results: read
from ``/proc/self/task/<tid>/schedstat``), ``ipc_share`` that time over the stage's wall
time. Measured on this shared 2-core machine (the benchmark job, 2M rows in 8 gzip CSV
files, 2 workers, 24 chunks of 100k lines): 0.19 s of 3.45 s = 5.4%, 195 MB sent (raw
CSV; Arrow IPC was 262 MB), 76 MB received; the target is < 10%. Pickle protocol 5
out-of-band buffers or shared memory would save one memcpy of bytes that cost a few
percent, so they were not worth their lifetime bookkeeping.

Failures (issues 4 and 5). A worker killed by a signal, or past ``chunk_timeout`` (pebble
kills it), fails only its own chunk; pebble starts a new worker, and a pool that breaks
anyway (pebble does when a worker dies while no task runs) is rebuilt.
What happens to the crashed chunk then (retries, splitting in halves after SIGKILL,
setting aside to the dead-letter output) is ``etl.transform.recovery``'s ``ChunkRunner``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pebble

from etl.core.config import OutputConfig, ReadConfig, TransformConfig
from etl.core.errors import (
    ChunkTimeout,
    ETLError,
    RemoteTraceback,
    StepError,
    WorkerCrashed,
)
from etl.core.parts import encode_parts, encode_rejects
from etl.core.queues import BoundedQueue, drain
from etl.core.records import RESULT_COUNTERS, Chunk, ChunkResult, Part
from etl.transform.recovery import ChunkRunner

log = logging.getLogger("etl.transform")

MAX_POOL_REBUILDS = 5  # a pool that breaks more often than this is broken by design (workers die at start)

# ------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the chunk; sent once per worker process."""

    transform: TransformConfig
    output: OutputConfig
    read: ReadConfig
    """How to parse raw CSV chunks (``read.parse = "worker"``)."""


_SPEC: WorkerSpec | None = None


def init_worker(spec: WorkerSpec, ignore_sigint: bool = False) -> None:
    """Pool initializer: keep the spec for every chunk and make ``python`` steps importable."""
    global _SPEC
    _SPEC = spec
    base = str(spec.transform.base_dir)
    if base not in sys.path:
        sys.path.insert(0, base)
    if ignore_sigint:
        # Ctrl-C reaches the whole process group; the parent decides how the run stops.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_chunk(chunk: Chunk, read: ReadConfig, on_error: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The chunk as a DataFrame indexed by row (or file line) number, and the rows that
    could not be parsed (raw CSV only, ``on_error`` other than ``fail``)."""
    if chunk.kind == "csv":
        from etl.read.csv_cut import parse_csv_chunk

        return parse_csv_chunk(chunk, read, on_error)
    from etl.write.folder import decode_ipc

    df = decode_ipc(chunk.data).to_pandas(types_mapper=pd.ArrowDtype)
    df.index = pd.RangeIndex(chunk.row_start, chunk.row_start + len(df))
    return df, None


def run_chunk(chunk: Chunk) -> ChunkResult:
    """Decode, transform and encode one chunk. Runs in a worker (or inline for serial)."""
    from etl.transform.steps import apply_steps

    assert _SPEC is not None, "init_worker() was not called in this process"
    spec = _SPEC
    start = time.perf_counter()
    df, malformed = decode_chunk(chunk, spec.read, spec.transform.on_error)
    decoded = time.perf_counter()
    try:
        result, rejects = apply_steps(
            df, spec.transform.steps, base_dir=spec.transform.base_dir,
            on_error=spec.transform.on_error, label=chunk.label, unit=chunk.unit,
        )  # fmt: skip
    except StepError:
        raise
    except Exception as e:
        raise StepError(f"{type(e).__name__}: {e}", item=chunk.label) from e
    stepped = time.perf_counter()
    parts = encode_parts(result, spec.output, source_index=chunk.source_index, chunk_index=chunk.index,
                         label=chunk.label)
    if malformed is not None:
        rejects = malformed if rejects is None else pd.concat([malformed, rejects], ignore_index=True)
    reject_part: Part | None = None
    n_rejected = 0 if rejects is None else len(rejects)
    if n_rejected and spec.transform.on_error == "quarantine":
        reject_part = encode_rejects(rejects, chunk)
    end = time.perf_counter()
    n_malformed = 0 if malformed is None else len(malformed)
    return ChunkResult(
        source_index=chunk.source_index, index=chunk.index, rows_in=len(df) + n_malformed,
        rows_out=len(result), rows_rejected=n_rejected, parts=parts, rejects=reject_part,
        seconds=end - start, decode_seconds=decoded - start, steps_seconds=stepped - decoded,
        encode_seconds=end - stepped,
    )  # fmt: skip


# ------------------------------------------------------------------- executors


@dataclass
class IpcStats:
    """Parent-side cost of moving chunks to workers and results back."""

    seconds: float = 0.0
    """CPU seconds of the pool's threads in the parent (pickle, send, receive, unpickle)."""
    bytes_sent: int = 0
    bytes_received: int = 0


class Executor(ABC):
    """Runs one attempt of one chunk. Crashes surface as ``WorkerCrashed``."""

    workers: int

    @abstractmethod
    async def run(self, chunk: Chunk) -> ChunkResult: ...

    @abstractmethod
    def close(self) -> None:
        """Stop every worker now; pending chunks are abandoned."""

    def ipc_stats(self) -> IpcStats:
        """In-process executors move no bytes between processes."""
        return IpcStats()


class ThreadExecutor(Executor):
    """``serial`` is this with one thread: the same code path, the reference output."""

    def __init__(self, spec: WorkerSpec, workers: int) -> None:
        self.workers = workers
        init_worker(spec)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="transform")

    async def run(self, chunk: Chunk) -> ChunkResult:
        return await asyncio.get_running_loop().run_in_executor(self._pool, run_chunk, chunk)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def mp_context() -> multiprocessing.context.BaseContext:
    """forkserver: never fork the threaded parent; workers come from a clean server process."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["etl.transform.stage", "etl.transform.steps", "etl.write.folder"])
    return ctx


class ProcessExecutor(Executor):
    """A pebble ``ProcessPool``: a dead or timed-out worker fails only its own task."""

    def __init__(self, spec: WorkerSpec, workers: int, timeout: float | None) -> None:
        self.workers = workers
        self._spec = spec
        self._timeout = timeout
        self._pool = self._new_pool()
        self._rebuilds = 0
        self._ipc = IpcStats()
        self._reapers: list[threading.Thread] = []

    def _new_pool(self) -> pebble.ProcessPool:
        return pebble.ProcessPool(
            max_workers=self.workers, initializer=init_worker, initargs=(self._spec, True),
            context=mp_context(),
        )  # fmt: skip

    async def run(self, chunk: Chunk) -> ChunkResult:
        while True:
            pool = self._pool
            try:
                future = pool.schedule(run_chunk, args=(chunk,), timeout=self._timeout)
                self._ipc.bytes_sent += chunk.nbytes
                result: ChunkResult = await asyncio.wrap_future(future)
            except (RuntimeError, BrokenProcessPool) as e:
                if pool.active:  # a RuntimeError of our own making, not a broken pool
                    raise
                self._rebuild(pool, chunk, e)
                continue  # the chunk never ran on a live worker: not an attempt
            except pebble.ProcessExpired as e:
                raise WorkerCrashed(
                    f"worker process died: {describe_exit(e.exitcode)}", item=chunk.label,
                    signal=describe_exit(e.exitcode),
                ) from None  # fmt: skip
            except concurrent.futures.TimeoutError:
                raise ChunkTimeout(
                    f"chunk ran longer than transform.chunk_timeout = {self._timeout}s; worker killed",
                    item=chunk.label, signal="killed at timeout",
                ) from None  # fmt: skip
            except ETLError as e:
                tb = getattr(e, "traceback", "")
                if tb:  # pebble sends the worker's traceback as text; keep it as the cause
                    e.__cause__ = RemoteTraceback(tb)
                raise
            self._ipc.bytes_received += result.nbytes
            return result

    def _rebuild(self, broken: pebble.ProcessPool, chunk: Chunk, error: BaseException) -> None:
        """Replace a broken pool once, however many chunks notice it."""
        if broken is not self._pool:
            return  # another chunk already rebuilt it
        self._rebuilds += 1
        if self._rebuilds > MAX_POOL_REBUILDS:
            raise ETLError(  # not a WorkerCrashed: retrying the chunk cannot help
                f"the worker pool broke {self._rebuilds} times, more than {MAX_POOL_REBUILDS} "
                f"(last: {error or type(error).__name__}); workers die outside any chunk, "
                "e.g. while starting", stage="transform", item=chunk.label,
            )  # fmt: skip
        log.warning("worker pool broke (%s); starting a new one", error or type(error).__name__,
                    extra={"stage": "transform"})  # fmt: skip
        self._ipc.seconds += _threads_cpu(broken)
        broken.stop()
        # Joining stops its idle workers but may take pebble's 3 s terminate grace: not on the loop.
        reaper = threading.Thread(target=broken.join, name="transform-pool-reaper", daemon=True)
        reaper.start()
        self._reapers.append(reaper)
        self._pool = self._new_pool()

    def ipc_stats(self) -> IpcStats:
        own = _threads_cpu(self._pool)
        return IpcStats(self._ipc.seconds + own, self._ipc.bytes_sent, self._ipc.bytes_received)

    def close(self) -> None:
        self._pool.stop()
        self._pool.join()
        for reaper in self._reapers:
            reaper.join()


def _threads_cpu(pool: pebble.ProcessPool) -> float:
    """CPU seconds the pool's threads used so far (0 where /proc is unavailable)."""
    total = 0.0
    for thread in getattr(pool, "_loops", ()):  # pebble's scheduler, manager and message threads
        if isinstance(thread, threading.Thread) and thread.native_id is not None:
            total += _thread_cpu(thread.native_id)
    return total


def _thread_cpu(tid: int) -> float:
    try:  # schedstat: nanoseconds on the CPU; safe to read for a thread that already exited
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def make_executor(cfg: TransformConfig, spec: WorkerSpec, workers: int, budget: int | None = None) -> Executor:
    """``budget``: the run's memory budget in bytes; a local Dask cluster splits it among its workers."""
    if cfg.executor == "serial":
        return ThreadExecutor(spec, 1)
    if cfg.executor == "thread":
        return ThreadExecutor(spec, workers)
    if cfg.executor == "process":
        return ProcessExecutor(spec, workers, cfg.chunk_timeout)
    from etl.transform.distributed import (
        DaskExecutor,  # optional extra: imported only when asked for
    )

    return DaskExecutor(spec, workers, cfg, budget=budget)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------ dispatcher


@dataclass
class TransformStats:
    chunks: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    retries: int = 0
    splits: int = 0
    """Chunks (or halves) retried as two halves after their worker was SIGKILLed."""
    pieces_set_aside: int = 0
    """Chunks (or halves) that crashed on every attempt and went to the dead-letter output."""
    worker_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps_seconds: float = 0.0
    encode_seconds: float = 0.0
    wall_seconds: float = 0.0
    ipc_seconds: float = 0.0
    """Parent CPU time spent sending chunks and receiving results (see the module docstring)."""
    ipc_bytes_sent: int = 0
    ipc_bytes_received: int = 0
    ipc_share: float = 0.0
    """``ipc_seconds`` over the stage's wall time: the target is below 0.10."""

    def add(self, result: ChunkResult) -> None:
        for name in RESULT_COUNTERS:
            mine = "worker_seconds" if name == "seconds" else name
            setattr(self, mine, getattr(self, mine) + getattr(result, name))

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


async def transform_stage(
    chunks: BoundedQueue[Chunk],
    results: BoundedQueue[ChunkResult],
    executor: Executor,
    cfg: TransformConfig,
    in_flight: int,
    progress: Any = None,
    *,
    ipc: Callable[[], IpcStats] | None = None,
    read: ReadConfig | None = None,
) -> TransformStats:
    """``ipc``: where to read the IPC cost when ``executor`` is a wrapper (default: its own);
    ``read``: how CSV chunks are parsed, for setting a crashed chunk's rows aside."""
    stats = TransformStats()
    runner = ChunkRunner(executor, cfg, stats, read or ReadConfig())
    start = time.perf_counter()

    async def one(chunk: Chunk) -> None:
        result = await runner.run(chunk)
        stats.add(result)
        stats.chunks += 1
        if progress is not None:
            progress.update(items=result.rows_in)
        await results.put(result)

    await drain(chunks, in_flight, one)  # at most in_flight chunks taken and not yet done
    await results.close()
    _finish(stats, ipc or getattr(executor, "ipc_stats", IpcStats), time.perf_counter() - start)
    return stats


def _finish(stats: TransformStats, ipc: Callable[[], IpcStats], wall: float) -> None:
    cost = ipc()
    stats.wall_seconds = wall
    stats.ipc_seconds, stats.ipc_bytes_sent, stats.ipc_bytes_received = cost.seconds, cost.bytes_sent, cost.bytes_received
    stats.ipc_share = cost.seconds / wall if wall > 0 else 0.0
    if cost.bytes_sent:
        log.info(
            "transform: parent spent %.2fs of %.2fs (%.1f%%) on IPC: %.1f MB sent, %.1f MB received",
            cost.seconds, wall, 100 * stats.ipc_share, cost.bytes_sent / 1e6, cost.bytes_received / 1e6,
            extra={"stage": "transform"},
        )  # fmt: skip

"""Executors: where one attempt of one chunk runs (thread, serial or process pool).

Every executor has the same contract (``Executor``): ``run(chunk)`` is one attempt of one
chunk and returns its ``ChunkResult``; a dead, killed or timed-out worker surfaces as
``WorkerCrashed`` (or ``ChunkTimeout``), and what happens next is ``etl.transform.recovery``'s
decision. ``close()`` stops every worker. The Dask executor is in ``etl.transform.distributed``.

Inter-process cost (``IpcStats``): the CPU time of the process pool's threads in the
parent (they pickle and send tasks, receive and unpickle results), read from
``/proc/self/task/<tid>/schedstat``, and the bytes sent and received.

Failures. A worker killed by a signal, or past ``chunk_timeout`` (pebble kills it), fails
only its own chunk; pebble starts a new worker, and a pool that breaks anyway (pebble
does when a worker dies while no task runs) is rebuilt, at most ``MAX_POOL_REBUILDS`` times.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import signal
import threading
from abc import ABC, abstractmethod
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pebble

from etl.core.errors import ChunkTimeout, ETLError, RemoteTraceback, WorkerCrashed
from etl.core.records import RESULT_COUNTERS, Chunk, ChunkResult
from etl.transform.worker import WorkerSpec, init_worker, run_chunk

log = logging.getLogger("etl.transform")

MAX_POOL_REBUILDS = 5  # a pool that breaks more often than this is broken by design (workers die at start)


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


@dataclass
class IpcStats:
    """Parent-side cost of moving chunks to workers and results back."""

    seconds: float = 0.0
    """CPU seconds of the pool's threads in the parent (pickle, send, receive, unpickle)."""
    bytes_sent: int = 0
    bytes_received: int = 0


class RunsChunks(Protocol):
    """What the dispatcher and the recovery runner need: an ``Executor``, or a wrapper of one
    (``etl.core.stats.MeteredExecutor``)."""

    workers: int

    async def run(self, chunk: Chunk) -> ChunkResult: ...

    def close(self) -> None: ...


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
    ctx.set_forkserver_preload(["etl.transform.worker"])  # pandas, pyarrow, steps: imported once
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
            max_workers=self.workers,
            initializer=init_worker,
            initargs=(self._spec, True),
            context=mp_context(),
        )

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
                    f"worker process died: {describe_exit(e.exitcode)}",
                    item=chunk.label,
                    signal=describe_exit(e.exitcode),
                ) from None
            except concurrent.futures.TimeoutError:
                raise ChunkTimeout(
                    f"chunk ran longer than transform.chunk_timeout = {self._timeout}s; worker killed",
                    item=chunk.label,
                    signal="killed at timeout",
                ) from None
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
                "e.g. while starting",
                stage="transform",
                item=chunk.label,
            )
        log.warning(
            "worker pool broke (%s); starting a new one", error or type(error).__name__, extra={"stage": "transform"}
        )
        self._ipc.seconds += _threads_cpu(broken)
        broken.stop()  # type: ignore[no-untyped-call]  # pebble's ProcessPool.stop() has no annotations
        # Joining stops its idle workers but may take pebble's 3 s terminate grace: not on the loop.
        reaper = threading.Thread(target=broken.join, name="transform-pool-reaper", daemon=True)
        reaper.start()
        self._reapers.append(reaper)
        self._pool = self._new_pool()

    def ipc_stats(self) -> IpcStats:
        own = _threads_cpu(self._pool)
        return IpcStats(self._ipc.seconds + own, self._ipc.bytes_sent, self._ipc.bytes_received)

    def close(self) -> None:
        self._pool.stop()  # type: ignore[no-untyped-call]  # pebble's ProcessPool.stop() has no annotations
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

"""Transform stage: run the job's steps on every chunk, on the executor that fits the work.

Queues and flow::

    chunks queue ──► dispatcher ──► executor.run(chunk) ──► results queue
    (BoundedQueue,    (event loop)   serial │ thread │ process │ dask     (BoundedQueue,
     closed by the                   at most `in_flight` chunks          closed by the
     read stage)                     submitted at once                   dispatcher)

* **In**: ``Chunk`` records (Arrow IPC bytes + identity) from the chunks queue.
* **Out**: one ``ChunkResult`` per chunk (encoded output parts, rejected rows, metrics),
  put on the results queue in completion order; part names carry source and chunk index,
  so the published output is the same whatever the order.
* **Bound**: a semaphore of ``in_flight`` permits: a chunk is taken from the queue only when
  a permit is free, so a slow pool pushes back on the readers.
* **End of stream**: when the chunks queue is drained and every in-flight chunk has
  returned, the dispatcher closes the results queue.
* **Crossing the process boundary**: only plain data. The ``WorkerSpec`` (validated
  transform and output config) goes once per worker through the pool's initializer; then
  a ``Chunk`` goes in and a ``ChunkResult`` comes out. Decoding, the steps and the output
  encoding (Parquet compression included) all run in the worker, off the parent's GIL.
* **Crashes**: a worker killed by a signal or past ``chunk_timeout`` fails only its own
  chunk (pebble's pool replaces the worker); the chunk is retried up to ``max_attempts``
  times and then fails the run naming the source, row range and signal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pebble

from etl.config import OutputConfig, TransformConfig
from etl.errors import ChunkTimeout, ETLError, RemoteTraceback, StepError, WorkerCrashed
from etl.flow import BoundedQueue
from etl.records import Chunk, ChunkResult, Part

log = logging.getLogger("etl.transform")

# ------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the chunk; sent once per worker process."""

    transform: TransformConfig
    output: OutputConfig


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


def run_chunk(chunk: Chunk) -> ChunkResult:
    """Decode, transform and encode one chunk. Runs in a worker (or inline for serial)."""
    from etl.steps import apply_steps
    from etl.storage import decode_ipc, encode_parts

    assert _SPEC is not None, "init_worker() was not called in this process"
    start = time.perf_counter()
    df = decode_ipc(chunk.data).to_pandas(types_mapper=pd.ArrowDtype)
    df.index = pd.RangeIndex(chunk.row_start, chunk.row_start + len(df))
    spec = _SPEC
    try:
        result, rejects = apply_steps(
            df, spec.transform.steps, base_dir=spec.transform.base_dir,
            on_error=spec.transform.on_error, label=chunk.label,
        )  # fmt: skip
    except StepError:
        raise
    except Exception as e:
        raise StepError(f"{type(e).__name__}: {e}", item=chunk.label) from e
    parts = encode_parts(result, spec.output, source_index=chunk.source_index, chunk_index=chunk.index,
                         label=chunk.label)
    reject_part: Part | None = None
    n_rejected = 0 if rejects is None else len(rejects)
    if n_rejected and spec.transform.on_error == "quarantine":
        reject_part = encode_rejects(rejects, chunk)
    return ChunkResult(
        source_index=chunk.source_index, index=chunk.index, rows_in=len(df),
        rows_out=len(result), rows_rejected=n_rejected, parts=parts, rejects=reject_part,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def encode_rejects(rejects: pd.DataFrame, chunk: Chunk) -> Part:
    """Dead-letter rows as JSON Lines: source, row, step, reason and the raw input row."""
    lines = [
        json.dumps({"source": chunk.source_name, "row": int(r["_row"]), "step": r["_step"],
                    "reason": r["_reason"], "raw": json.loads(r["_raw"]) if r["_raw"] else None})  # fmt: skip
        for r in rejects.to_dict("records")
    ]
    data = ("\n".join(lines) + "\n").encode()
    return Part(f"rejected-{chunk.source_index:05d}-{chunk.index:06d}.jsonl", data, len(lines))


# ------------------------------------------------------------------- executors


class Executor(ABC):
    """Runs one attempt of one chunk. Crashes surface as ``WorkerCrashed``."""

    workers: int

    @abstractmethod
    async def run(self, chunk: Chunk) -> ChunkResult: ...

    @abstractmethod
    def close(self) -> None:
        """Stop every worker now; pending chunks are abandoned."""


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
    ctx.set_forkserver_preload(["etl.transform", "etl.steps", "etl.storage"])
    return ctx


class ProcessExecutor(Executor):
    def __init__(self, spec: WorkerSpec, workers: int, timeout: float | None) -> None:
        self.workers = workers
        self._timeout = timeout
        self._pool = pebble.ProcessPool(
            max_workers=workers, initializer=init_worker, initargs=(spec, True), context=mp_context()
        )

    async def run(self, chunk: Chunk) -> ChunkResult:
        future = self._pool.schedule(run_chunk, args=(chunk,), timeout=self._timeout)
        try:
            return await asyncio.wrap_future(future)
        except pebble.ProcessExpired as e:
            raise WorkerCrashed(
                f"worker process died: {describe_exit(e.exitcode)}", item=chunk.label,
                signal=describe_exit(e.exitcode),
            ) from None  # fmt: skip
        except concurrent.futures.TimeoutError:
            raise ChunkTimeout(
                f"chunk ran longer than transform.chunk_timeout = {self._timeout}s; worker killed",
                item=chunk.label, signal="SIGKILL (timeout)",
            ) from None  # fmt: skip
        except ETLError as e:
            tb = getattr(e, "traceback", "")
            if tb:  # pebble sends the worker's traceback as text; keep it as the cause
                e.__cause__ = RemoteTraceback(tb)
            raise

    def close(self) -> None:
        self._pool.stop()
        self._pool.join()


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def make_executor(cfg: TransformConfig, spec: WorkerSpec, workers: int) -> Executor:
    if cfg.executor == "serial":
        return ThreadExecutor(spec, 1)
    if cfg.executor == "thread":
        return ThreadExecutor(spec, workers)
    if cfg.executor == "process":
        return ProcessExecutor(spec, workers, cfg.chunk_timeout)
    from etl.dask_executor import DaskExecutor  # optional extra: imported only when asked for

    return DaskExecutor(spec, workers, cfg)


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
    worker_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def transform_stage(
    chunks: BoundedQueue[Chunk],
    results: BoundedQueue[ChunkResult],
    executor: Executor,
    cfg: TransformConfig,
    in_flight: int,
    progress: Any = None,
) -> TransformStats:
    stats = TransformStats()
    window = asyncio.Semaphore(in_flight)

    async def one(chunk: Chunk) -> None:
        try:
            result = await _with_retries(executor, chunk, cfg.max_attempts, stats)
            stats.chunks += 1
            stats.rows_in += result.rows_in
            stats.rows_out += result.rows_out
            stats.rows_rejected += result.rows_rejected
            stats.worker_seconds += result.seconds
            if progress is not None:
                progress.update(items=result.rows_in)
            await results.put(result)
        finally:
            window.release()

    async with asyncio.TaskGroup() as tg:
        while True:
            await window.acquire()
            chunk = await chunks.get()
            if chunk is None:
                break
            tg.create_task(one(chunk))
    await results.close()
    return stats


async def _with_retries(
    executor: Executor, chunk: Chunk, max_attempts: int, stats: TransformStats
) -> ChunkResult:
    for attempt in range(1, max_attempts + 1):
        try:
            result = await executor.run(chunk)
            result.attempts = attempt
            return result
        except WorkerCrashed as e:
            e.attempts = attempt
            if attempt == max_attempts:
                e.message += f" (attempt {attempt} of transform.max_attempts = {max_attempts})"
                raise
            stats.retries += 1
            log.warning(
                "%s: %s; retrying (attempt %d of %d)", chunk.label, e.message, attempt + 1,
                max_attempts, extra={"stage": "transform", "source": chunk.source_name},
            )  # fmt: skip
    raise AssertionError("unreachable")

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
  transform and output config) goes once per worker when it starts (``worker.serve``); then
  a ``Chunk`` goes in and a ``ChunkResult`` comes out. CSV parsing (``read.parse =
  "worker"``), the steps and the output encoding (Parquet compression included) all run
  in the worker, off the parent's cores.

Inter-process cost (issue 4). CSV chunks travel as raw text cut at record ends (the
reader threads only decompress and cut; the worker parses, ``etl.read.csv_cut``), JSON Lines
and Parquet chunks as uncompressed Arrow IPC stream bytes (decoded zero-copy), and parts
come back already Parquet-encoded and compressed, so each direction pickles one large
``bytes`` object: a memcpy plus a pipe write, no per-row work in the parent. It is
measured in every run: ``TransformStats.ipc_seconds`` is the CPU time of the pool's slot
threads in the parent (one per worker: they pickle and send chunks, receive and unpickle
results: read from ``/proc/self/task/<tid>/schedstat``), ``ipc_share`` that time over the
stage's wall time. Measured on this shared 2-core machine (the benchmark job, 2M rows in 8
gzip CSV files, 2 workers, 24 chunks of 100k lines, on pebble's pool): 0.19 s of 3.45 s =
5.4%, 195 MB sent (raw CSV; Arrow IPC was 262 MB), 76 MB received; the target is < 10%.
With the pool of issue 21 (one pipe per worker), 500k rows in 4 files, under load 7: 0.04 s
of 7.67 s = 0.6%, 53.3 MB sent, 19.9 MB received. Pickle protocol 5
out-of-band buffers or shared memory would save one memcpy of bytes that cost a few
percent, so they were not worth their lifetime bookkeeping.

Where the pieces live: ``etl.transform.worker`` (what runs in a worker),
``etl.transform.executors`` (thread, serial and process executors; a dead worker fails only
its own chunk), ``etl.transform.distributed`` (Dask), ``etl.transform.recovery`` (what
happens to a crashed chunk: retries, splitting in halves after SIGKILL, setting aside to
the dead-letter output), ``etl.transform.steps`` (the steps themselves).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from etl.core.config import ReadConfig, TransformConfig
from etl.core.queues import Gettable, Puttable, drain
from etl.core.records import Chunk, ChunkResult
from etl.transform.executors import (
    Executor,
    IpcStats,
    ProcessExecutor,
    RunsChunks,
    ThreadExecutor,
    TransformStats,
)
from etl.transform.recovery import ChunkRunner, Watchdog
from etl.transform.worker import WorkerSpec

log = logging.getLogger("etl.transform")


def make_executor(cfg: TransformConfig, spec: WorkerSpec, workers: int, budget: int | None = None) -> Executor:
    """``budget``: the run's memory budget in bytes; a local Dask cluster splits it among its workers."""
    if cfg.executor == "serial":
        return ThreadExecutor(spec, 1, cfg.chunk_timeout)
    if cfg.executor == "thread":
        return ThreadExecutor(spec, workers, cfg.chunk_timeout)
    if cfg.executor == "process":
        return ProcessExecutor(spec, workers, cfg.chunk_timeout)
    from etl.transform.distributed import (
        DaskExecutor,  # optional extra: imported only when asked for
    )

    return DaskExecutor(spec, workers, cfg, budget=budget)


async def transform_stage(
    chunks: Gettable[Chunk],
    results: Puttable[ChunkResult],
    executor: RunsChunks,
    cfg: TransformConfig,
    in_flight: int,
    progress: Any = None,
    *,
    ipc: Callable[[], IpcStats] | None = None,
    read: ReadConfig | None = None,
    busy: Callable[[], int] | None = None,
) -> TransformStats:
    """``ipc``: where to read the IPC cost when ``executor`` is a wrapper (default: its own);
    ``read``: how CSV chunks are parsed, for setting a crashed chunk's rows aside;
    ``busy``: the executor's ``busy()`` for the stall watchdog when ``executor`` is a
    wrapper (default: its own; with neither, chunks are not watched)."""
    stats = TransformStats()
    busy = busy or getattr(executor, "busy", None)
    watchdog = Watchdog(cfg.stall_timeout, busy) if busy is not None else None
    runner = ChunkRunner(executor, cfg, stats, read or ReadConfig(), watchdog)
    start = time.perf_counter()

    async def one(chunk: Chunk) -> None:
        result = await runner.run(chunk)
        stats.add(result)
        stats.chunks += 1
        if progress is not None:
            progress.update(items=result.rows_in, nbytes=chunk.source_bytes)  # the chunk once, split or not
        await results.put(result)

    watching = asyncio.create_task(watchdog.run(), name="transform-watchdog") if watchdog else None
    try:
        await drain(chunks, in_flight, one)  # at most in_flight chunks taken and not yet done
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    if watchdog is not None:
        stats.stalls, stats.longest_quiet_seconds = watchdog.stalls, watchdog.longest_quiet
    await results.close()
    _finish(
        stats,
        ipc or cast(Callable[[], IpcStats], getattr(executor, "ipc_stats", IpcStats)),
        time.perf_counter() - start,
    )
    return stats


def _finish(stats: TransformStats, ipc: Callable[[], IpcStats], wall: float) -> None:
    cost = ipc()
    stats.wall_seconds = wall
    stats.ipc_seconds, stats.ipc_bytes_sent, stats.ipc_bytes_received = (
        cost.seconds,
        cost.bytes_sent,
        cost.bytes_received,
    )
    stats.ipc_share = cost.seconds / wall if wall > 0 else 0.0
    if cost.bytes_sent:
        log.info(
            "transform: parent spent %.2fs of %.2fs (%.1f%%) on IPC: %.1f MB sent, %.1f MB received",
            cost.seconds,
            wall,
            100 * stats.ipc_share,
            cost.bytes_sent / 1e6,
            cost.bytes_received / 1e6,
            extra={"stage": "transform"},
        )

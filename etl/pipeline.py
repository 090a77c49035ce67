"""Wires the stages together on one event loop and runs a job.

::

    sources ─► DOWNLOAD (asyncio + aiohttp) ─► files queue ─► READ (thread pool, pyarrow)
           ─► chunks queue ─► TRANSFORM (process pool) ─► results queue ─► WRITE (thread pool)
           ─► temp folder beside the output ─► publish (rename) when every chunk succeeded

All four stages run at once as tasks of one ``asyncio.TaskGroup``; thread and process work
is awaited from the loop, so backpressure is "await the put" and a failure anywhere
surfaces here. Each queue is closed by the single stage that feeds it (download closes
files, read closes chunks, transform closes results). When a stage fails, every queue is
aborted so no thread stays blocked on a full queue, the temp output is discarded, the
pool is stopped, and the previous output stays as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from etl.config import JobConfig
from etl.download import download_stage
from etl.errors import ETLError
from etl.flow import BoundedQueue, QueueAborted
from etl.progress import Progress
from etl.records import Chunk, ChunkResult, Source, StagedFile
from etl.sources import expand_sources
from etl.storage import OutputWriter, read_chunks
from etl.transform import WorkerSpec, default_workers, make_executor, transform_stage

log = logging.getLogger("etl.pipeline")

FILES_QUEUE_ITEMS = 4  # staged files waiting for a reader: only paths, but more means more disk
CHUNKS_QUEUE_BYTES = 256 << 20  # Arrow chunks waiting for a worker: memory vs. keeping workers fed
RESULTS_QUEUE_BYTES = 256 << 20  # encoded parts waiting for a writer: compressed, so small


@dataclass
class StageTime:
    start: float = 0.0
    end: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass
class RunSummary:
    run_id: str
    job: str
    sources: int = 0
    files_read: int = 0
    chunks: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    bytes_downloaded: int = 0
    bytes_read: int = 0
    parts_written: int = 0
    wall_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    queues: list[dict[str, Any]] = field(default_factory=list)
    download: dict[str, Any] = field(default_factory=dict)
    transform: dict[str, Any] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    workers: int = 0


@dataclass
class RunOptions:
    full_refresh: bool = False
    progress: str = "off"
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])


class Run:
    """One run of one job: owns the queues, pools and temp output for its lifetime."""

    def __init__(self, cfg: JobConfig, opts: RunOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.summary = RunSummary(run_id=opts.run_id, job=cfg.job.name)
        self.times = {s: StageTime() for s in ("download", "read", "transform", "write")}
        self.progress = Progress(opts.progress)  # type: ignore[arg-type]

    async def execute(self) -> RunSummary:
        cfg, summary = self.cfg, self.summary
        start = time.perf_counter()
        sources = expand_sources(cfg)
        summary.sources = len(sources)
        workers = cfg.transform.workers if isinstance(cfg.transform.workers, int) else default_workers()
        if cfg.transform.executor == "serial":
            workers = 1
        in_flight = cfg.transform.in_flight if isinstance(cfg.transform.in_flight, int) else 2 * workers
        summary.workers = workers
        OutputWriter.clean_leftovers(cfg.output)
        writer = OutputWriter(cfg.output, self.opts.run_id)
        executor = make_executor(cfg.transform, WorkerSpec(cfg.transform, cfg.output), workers)
        self.files_q: BoundedQueue[StagedFile] = BoundedQueue("files", FILES_QUEUE_ITEMS, 1 << 62)
        self.chunks_q: BoundedQueue[Chunk] = BoundedQueue("chunks", max(2, in_flight), CHUNKS_QUEUE_BYTES)
        self.results_q: BoundedQueue[ChunkResult] = BoundedQueue("results", max(2, in_flight), RESULTS_QUEUE_BYTES)
        queues = (self.files_q, self.chunks_q, self.results_q)
        # Pools live outside the stage coroutines: shutting one down waits for its threads,
        # which must never happen on the loop while a thread waits on the loop (a queue put).
        self.read_pool = ThreadPoolExecutor(cfg.read.threads, thread_name_prefix="read")
        self.write_pool = ThreadPoolExecutor(cfg.output.writer_threads, thread_name_prefix="write")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._stage("download", self._download(sources), queues))
                tg.create_task(self._stage("read", self._read(), queues))
                tg.create_task(self._stage("transform", self._transform(executor, in_flight), queues))
                tg.create_task(self._stage("write", self._write(writer), queues))
        except BaseException as e:
            for q in queues:
                q.abort()
            await self._join_pools()
            writer.discard()
            err = _first_error(e)
            if err is e:
                raise
            raise err from err.__cause__
        finally:
            executor.close()
            self.progress.close()
        await self._join_pools()
        try:
            summary.published = writer.publish()
        except BaseException:
            writer.discard()  # publish already undid its own moves; drop the temp folder now
            raise
        summary.wall_seconds = time.perf_counter() - start
        summary.stage_seconds = {k: round(v.seconds, 3) for k, v in self.times.items()}
        summary.queues = [q.stats.as_dict() for q in queues]
        return summary

    async def _join_pools(self) -> None:
        """Wait for reader and writer threads off the loop (they may still need it to unblock)."""
        for pool in (self.read_pool, self.write_pool):
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def _stage(self, name: str, coro: Any, queues: tuple[BoundedQueue[Any], ...]) -> None:
        t = self.times[name]
        t.start = time.perf_counter()
        try:
            await coro
        except BaseException:
            for q in queues:
                q.abort()  # wake threads blocked on a full queue; the other stages stop too
            raise
        finally:
            t.end = time.perf_counter()

    async def _download(self, sources: list[Source]) -> None:
        cfg = self.cfg
        bar = self.progress.stage("download", "files", total=len(sources))
        stats = await download_stage(
            sources, cfg.download, cfg.job_state_dir / "staging", self.files_q,
            state_file=cfg.job_state_dir / "sources.json", full_refresh=self.opts.full_refresh,
            progress=bar,
        )  # fmt: skip
        self.summary.download = stats.as_dict()
        self.summary.bytes_downloaded = stats.bytes

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        bar = self.progress.stage("read", "chunks")
        slots = asyncio.Semaphore(self.cfg.read.threads)

        def read_file(staged: StagedFile) -> None:
            for chunk in read_chunks(staged, self.cfg.read):
                self.chunks_q.put_threadsafe(chunk)
                bar.update(items=1, nbytes=chunk.nbytes)
            self.summary.files_read += 1
            self.summary.bytes_read += staged.size

        async def one(staged: StagedFile) -> None:
            try:
                await loop.run_in_executor(self.read_pool, read_file, staged)
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                await slots.acquire()
                staged = await self.files_q.get()
                if staged is None:
                    break
                tg.create_task(one(staged))
        await self.chunks_q.close()

    async def _transform(self, executor: Any, in_flight: int) -> None:
        bar = self.progress.stage("transform", "rows")
        stats = await transform_stage(self.chunks_q, self.results_q, executor, self.cfg.transform, in_flight, bar)
        s = self.summary
        s.chunks, s.rows_in, s.rows_out, s.rows_rejected = stats.chunks, stats.rows_in, stats.rows_out, stats.rows_rejected
        s.transform = stats.as_dict()

    async def _write(self, writer: OutputWriter) -> None:
        loop = asyncio.get_running_loop()
        bar = self.progress.stage("write", "parts")

        def write(result: ChunkResult) -> None:
            for part in result.parts:
                writer.write(part)
                bar.update(items=1, nbytes=len(part.data))
            if result.rejects is not None:
                writer.write_rejects(result.rejects)
            self.summary.parts_written += len(result.parts)

        slots = asyncio.Semaphore(self.cfg.output.writer_threads)

        async def one(result: ChunkResult) -> None:
            try:
                await loop.run_in_executor(self.write_pool, write, result)
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tg:
            while True:
                await slots.acquire()
                result = await self.results_q.get()
                if result is None:
                    break
                tg.create_task(one(result))


def _first_error(e: BaseException) -> BaseException:
    """The root cause inside (nested) exception groups: an ETLError first, else any error."""
    if isinstance(e, BaseExceptionGroup):
        leaves = list(_leaves(e))
        for leaf in leaves:
            if isinstance(leaf, ETLError):
                return leaf
        for leaf in leaves:
            if not isinstance(leaf, (asyncio.CancelledError, QueueAborted)):
                return leaf
        return leaves[0] if leaves else e
    return e


def _leaves(e: BaseException) -> Any:
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from _leaves(sub)
    else:
        yield e


async def run_job(cfg: JobConfig, opts: RunOptions | None = None) -> RunSummary:
    return await Run(cfg, opts or RunOptions()).execute()

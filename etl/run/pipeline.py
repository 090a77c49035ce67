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
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from etl.core.chunks import decode_chunk, head
from etl.core.config import JobConfig
from etl.core.errors import ETLError
from etl.core.queues import BoundedQueue, QueueAborted
from etl.core.records import Chunk, ChunkResult, Source, StagedFile
from etl.core.stats import MeteredExecutor, MeteredPut, RunStats
from etl.download.http import fetch_head
from etl.download.sources import expand_sources
from etl.download.stage import download_stage
from etl.ops.progress import Mode, Progress, StageProgress
from etl.read.csv_cut import MAX_CHUNK_BYTES
from etl.read.sample import can_sample_head, sample_chunk, sample_from_head
from etl.read.stage import read_stage
from etl.run.allocators import release_free_memory
from etl.run.checks import Gate, previous_output_rows
from etl.run.commits import Commits
from etl.run.memguard import GatedChunks, MemoryGuard, ReleasingPut
from etl.run.resources import (
    FALLBACK_CHUNK_BYTES_PER_ROW,
    FALLBACK_READER_BYTES,
    FALLBACK_RESULT_BYTES_PER_ROW,
    FALLBACK_WORK_BYTES_PER_ROW,
    PROBE_READ_ROWS,
    PROBE_ROWS,
    READER_SLACK,
    REMOTE_SAMPLE_BYTES,
    Probe,
    ResourcePlan,
    plan_resources,
)
from etl.transform.checks import validate_checks
from etl.transform.probe import WARM_ROWS, measure_in_worker
from etl.transform.stage import make_executor, transform_stage
from etl.transform.steps import validate_steps
from etl.transform.worker import WorkerSpec, init_worker, run_chunk
from etl.write.folder import OutputWriter
from etl.write.stage import clean_leftovers, open_writer, write_stage

log = logging.getLogger("etl.pipeline")

FILES_QUEUE_ITEMS = 4  # staged files waiting for a reader: only paths, but more means more disk


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
    sources_skipped: int = 0
    """Sources not processed: unchanged since the published output, or resumed (etl/state.py)."""
    per_source: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    """Per-stage busy/wait/blocked, queue high-water marks, process-tree RSS and CPU (etl/stats.py)."""
    plan: dict[str, Any] = field(default_factory=dict)
    """Workers, chunk size, queue bounds and the measurements behind them (etl/resources.py)."""
    memory: dict[str, Any] = field(default_factory=dict)
    """Memory guard: peak sampled process-tree RSS, pauses, forced admits (etl/memguard.py)."""
    checks: dict[str, Any] = field(default_factory=dict)
    """``[checks]``: rows to publish and every check's result (etl/run/checks.py)."""


def new_run_id() -> str:
    """``20261129T105448.123-462c15``: the UTC start to the millisecond, then 6 random hex
    digits. The newest report, the last successful run (``checks.max_drop``, metrics) and
    the reports kept are found by sorting ids, so runs of one job must sort in start order,
    also two that start in the same second (a short job's next run often does)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now * 1000) % 1000:03d}-{uuid.uuid4().hex[:6]}"


@dataclass
class RunOptions:
    full_refresh: bool = False
    progress: Mode = "off"
    run_id: str = field(default_factory=new_run_id)


class Run:
    """One run of one job: owns the queues, pools and temp output for its lifetime."""

    def __init__(self, cfg: JobConfig, opts: RunOptions) -> None:
        self.cfg = cfg
        self.opts = opts
        self.summary = RunSummary(run_id=opts.run_id, job=cfg.job.name)
        self.times = {s: StageTime() for s in ("download", "read", "transform", "write")}
        self.progress = Progress(opts.progress)

    async def execute(self) -> RunSummary:
        cfg, summary = self.cfg, self.summary
        start = time.perf_counter()
        sources = expand_sources(cfg)
        summary.sources = len(sources)
        configured = cfg
        # The sampler starts before planning: the probe's worker counts in the run's peak RSS.
        self.stats = RunStats()
        self.stats.start()
        try:
            cfg, plan = await asyncio.to_thread(plan_job, cfg, sources)  # seconds: off the loop
        except BaseException:
            self.stats.stop()
            raise
        self.cfg = cfg
        release_free_memory()  # the probe's freed frames would otherwise stay in this process's heap
        workers, in_flight = plan.workers, plan.in_flight
        summary.workers, summary.plan = workers, plan.as_dict()
        self.guard = MemoryGuard(plan.budget, plan.solo_chunk_bytes)
        slots = {"download": 1, "read": cfg.read.threads, "transform": workers, "write": cfg.output.writer_threads}
        self.stats.set_slots(slots)
        self.stats.sampler.listeners.append(self.guard.observe)
        # Skips follow the job as configured, not as planned: the planner's chunk size moves
        # with the memory it measures, and rows do not depend on it (only part sizes do).
        self.commits = Commits(configured, self.opts.run_id, self.opts.full_refresh)
        adopt = self.commits.recover(sources)  # before clean_leftovers: it may keep a temp folder
        clean_leftovers(cfg.output, keep=adopt)
        writer = open_writer(cfg.output, self.opts.run_id, adopt=adopt)
        self.commits.begin(writer)
        self.gate = Gate(cfg, self.opts.run_id, sources)
        # Workers on this machine write their pieces into the writer's folder themselves: the
        # rows skip the pipe and the parent's memory. A Dask worker may be on another machine.
        spool = None if cfg.transform.executor == "dask" else str(writer.incoming())
        spec = WorkerSpec(cfg.transform, cfg.output, cfg.read, cfg.checks, spool=spool)
        executor = make_executor(cfg.transform, spec, workers, plan.budget)
        self.files_q: BoundedQueue[StagedFile] = BoundedQueue("files", FILES_QUEUE_ITEMS, 1 << 62)
        self.chunks_q: BoundedQueue[Chunk] = BoundedQueue("chunks", plan.chunks_queue_items, plan.chunks_queue_bytes)
        self.results_q: BoundedQueue[ChunkResult] = BoundedQueue(
            "results", plan.results_queue_items, plan.results_queue_bytes
        )
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
            stopped = isinstance(e, asyncio.CancelledError)  # a signal: the next run resumes
            self.gate.discard()
            if not self.commits.failed(interrupted=stopped):
                writer.discard()
            err = _first_error(e)
            if err is e:
                raise
            raise err from err.__cause__
        finally:
            summary.memory = self.guard.as_dict()
            executor.close()
            self.progress.close()
            self.stats.stop()
        await self._join_pools()
        self._check(writer)  # raises ChecksFailed (exit 4): nothing published
        self.commits.publishing()
        try:
            summary.published = writer.publish()
        except BaseException:
            self.commits.failed()
            writer.discard()  # publish already undid its own moves; drop the temp folder now
            raise
        self.commits.published()
        summary.per_source = self.commits.report()
        summary.sources_skipped = sum(s["status"] != "processed" for s in summary.per_source)
        summary.wall_seconds = time.perf_counter() - start
        summary.stage_seconds = {k: round(v.seconds, 3) for k, v in self.times.items()}
        summary.queues = [q.stats.as_dict() for q in queues]
        summary.stats = self.stats.finish(summary.wall_seconds, summary.queues, summary.memory)
        return summary

    def _written(self, result: ChunkResult, parts: list[tuple[str, int, int]]) -> None:
        """A writer thread wrote one chunk's parts: commit them, and keep its check results."""
        self.commits.written(result, parts)
        self.gate.add(result)

    def _check(self, writer: OutputWriter) -> None:
        """The gate: every check on this run's data, before anything is published."""
        s = self.summary
        if self.cfg.output.mode == "overwrite":
            publish = sum(p["rows_out"] for p in self.commits.report())  # carried-over sources too
        else:
            publish = s.rows_out
        try:
            s.checks = self.gate.finish(
                rows_in=s.rows_in,
                rows_rejected=s.rows_rejected,
                published_rows=publish,
                previous_rows=previous_output_rows(self.commits.manifest.published),
            )
        except BaseException:
            self.commits.failed()
            writer.discard()
            raise

    async def _join_pools(self) -> None:
        """Wait for reader and writer threads off the loop (they may still need it to unblock)."""
        for pool in (self.read_pool, self.write_pool):
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def _stage(self, name: str, coro: Any, queues: tuple[BoundedQueue[Any], ...]) -> None:
        t = self.times[name]
        t.start = time.perf_counter()
        self.stats.meters[name].start()
        try:
            await coro
        except BaseException:
            for q in queues:
                q.abort()  # wake threads blocked on a full queue; the other stages stop too
            raise
        finally:
            t.end = time.perf_counter()
            self.stats.meters[name].stop()

    async def _download(self, sources: list[Source]) -> None:
        cfg = self.cfg
        bar = self.progress.stage("download", "files", total=len(sources))
        # The read and transform bars count source bytes against the sources' sizes, known as soon as the
        # download stage learns them (Content-Length, object or local size) or, failing that, once staged.
        self.read_bar = self.progress.stage("read", "chunks", by_bytes=True)
        self.transform_bar = self.progress.stage("transform", "rows", by_bytes=True)
        meter = self.stats.meters["download"]
        sized = _Sized(self.files_q, self.read_bar, self.transform_bar, count=len(sources))
        files_out = MeteredPut(sized, meter, from_work=True, size=lambda f: f.size)
        with meter.working():
            stats = await download_stage(
                sources,
                cfg.download,
                cfg.staging_dir,
                files_out,
                state_file=cfg.job_state_dir / "sources.json",
                full_refresh=self.opts.full_refresh,
                progress=bar,
                sized=sized.expect,
            )
        self.read_bar.settle()
        self.transform_bar.settle()
        self.summary.download = stats.as_dict()
        self.summary.bytes_downloaded = stats.bytes
        meter.count_in(len(sources), stats.bytes)

    async def _read(self) -> None:
        stats = await read_stage(
            self.files_q,
            self.chunks_q,
            self.cfg.read,
            self.read_pool,
            meter=self.stats.meters["read"],
            progress=self.read_bar,
            admit=self._admit,
            done=self.commits.read_done,
            unread=lambda n: self.transform_bar.update(nbytes=n),
            set_aside=self.cfg.transform.on_error != "fail",
        )
        self.summary.files_read, self.summary.bytes_read = stats.files, stats.bytes

    def _admit(self, staged: StagedFile) -> bool:
        """Whether the read stage reads this file (``Commits.check``); a file it skips leaves the bars' totals."""
        if self.commits.check(staged):
            return True
        self.read_bar.expect(-staged.size)
        self.transform_bar.expect(-staged.size)
        return False

    async def _transform(self, executor: Any, in_flight: int) -> None:
        bar = self.transform_bar
        meter = self.stats.meters["transform"]
        results_in = MeteredPut(
            self.results_q, meter, from_work=False, size=lambda r: r.output_bytes, rows=lambda r: r.rows_out
        )
        stats = await transform_stage(
            GatedChunks(self.chunks_q, self.results_q, self.guard),
            ReleasingPut(results_in, self.guard),
            MeteredExecutor(executor, meter),
            self.cfg.transform,
            in_flight,
            bar,
            ipc=executor.ipc_stats,
            read=self.cfg.read,
            busy=executor.busy,
        )
        s = self.summary
        s.chunks, s.rows_in, s.rows_out, s.rows_rejected = (
            stats.chunks,
            stats.rows_in,
            stats.rows_out,
            stats.rows_rejected,
        )
        s.transform = stats.as_dict()

    async def _write(self, writer: OutputWriter) -> None:
        stats = await write_stage(
            self.results_q,
            writer,
            self.cfg.output.writer_threads,
            self.write_pool,
            meter=self.stats.meters["write"],
            progress=self.progress.stage("write", "parts"),
            written=self._written,
        )
        self.summary.parts_written = stats.parts


class _Sized:
    """The files queue, seen by the download stage: a source's size joins the read and
    transform bars' totals as soon as the stage knows it (``expect``: Content-Length, object
    or local size) and is corrected to the staged size when the file is put (a size not
    known before, e.g. chunked transfer, joins then). A source's size counts once however
    often it is told (retries); a file the read stage skips leaves the totals (``_admit``).
    Once every one of the ``count`` sources has a size the totals are final (``settle``),
    before the downloads end."""

    def __init__(self, queue: BoundedQueue[StagedFile], *bars: StageProgress, count: int) -> None:
        self._queue, self._bars, self._count = queue, bars, count
        self._known: dict[int, int] = {}  # source index -> bytes in the totals
        self._lock = threading.Lock()  # objects tell their size from a download thread
        self._settled = False

    def expect(self, src: Source, nbytes: int) -> None:
        with self._lock:
            change = nbytes - self._known.get(src.index, 0)
            self._known[src.index] = nbytes
            settle = not self._settled and len(self._known) >= self._count
            self._settled |= settle
        if settle:  # every size is known: the total is final with this one
            for bar in self._bars:
                bar.settle()
        if change:
            for bar in self._bars:
                bar.expect(change)

    async def put(self, staged: StagedFile) -> None:
        self.expect(staged.source, staged.size)
        await self._queue.put(staged)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)  # close, abort, stats: the queue's own


def plan_job(cfg: JobConfig, sources: list[Source]) -> tuple[JobConfig, ResourcePlan]:
    """The resource plan and the job as it will run under it (planned chunk rows, reader
    threads, executor, writer threads)."""
    plan = plan_resources(cfg, lambda c: measure(c, sources))
    read = cfg.read.model_copy(update={"chunk_rows": plan.chunk_rows, "threads": plan.read_threads})
    transform = cfg.transform.model_copy(update={"executor": plan.executor})
    output = cfg.output.model_copy(update={"writer_threads": plan.writer_threads})
    return cfg.model_copy(update={"read": read, "transform": transform, "output": output}), plan


def validate_job(cfg: JobConfig) -> JobConfig:
    """The checks ``load_job`` cannot make alone, made before any work starts: the steps
    (functions importable, expressions valid) and the sources (ranges, listing files and
    object-store globs expand). Raises ``ConfigError`` naming the key and the file."""
    validate_steps(cfg.transform.steps, cfg.base_dir, file=str(cfg.file))
    validate_checks(cfg.checks, file=str(cfg.file))
    expand_sources(cfg)
    return cfg


def measure(cfg: JobConfig, sources: list[Source]) -> Probe:
    """What a chunk of this job costs (``etl.run.resources.Probe``): the first chunk of the
    first local source, read as the read stage would and transformed in a throw-away worker.
    A remote-only job is measured on the copy of its first source an earlier run staged,
    else on the first ``REMOTE_SAMPLE_BYTES`` of it; without a chunk, on estimates."""
    parent_base = psutil.Process().memory_info().rss
    local = next((s for s in sources if not s.is_remote), None)
    with tempfile.TemporaryDirectory(prefix="etl-probe-") as folder:
        if local is None and sources:
            local = _staged_copy(cfg, sources[0]) or _remote_sample(cfg, sources[0], Path(folder))
        chunk, reader_bytes = None, FALLBACK_READER_BYTES
        if local is not None:
            try:
                chunk, grown = sample_chunk(local, cfg.read, PROBE_ROWS, PROBE_READ_ROWS)
                reader_bytes = int(grown * READER_SLACK)
            except (ETLError, OSError) as e:  # the run itself reports bad input, with context
                log.info("could not measure %s (%s); using estimates", local.name, e, extra={"stage": "plan"})
    spec = WorkerSpec(cfg.transform, cfg.output, cfg.read)
    # Threads transform in this process, so they are measured here: a throw-away worker
    # process (~200 MiB) beside the parent would pass a small budget before the run starts.
    threads = cfg.transform.executor in ("thread", "serial")
    found = _measure_in_parent(spec, chunk) if threads else measure_in_worker(spec, chunk)
    servers = sum(_rss(p) for p in psutil.Process().children(recursive=True))  # fork server, tracker
    if chunk is None or "work" not in found:
        rows = PROBE_ROWS
        return Probe(
            rows,
            FALLBACK_CHUNK_BYTES_PER_ROW * rows,
            reader_bytes,
            parent_base,
            found["base"],
            FALLBACK_WORK_BYTES_PER_ROW * rows,
            result_bytes=FALLBACK_RESULT_BYTES_PER_ROW * rows,
            servers=servers,
        )
    return Probe(
        chunk.rows,
        chunk.nbytes,
        reader_bytes,
        parent_base,
        found["base"],
        found["work"],
        found["frame"],
        found["result"],
        servers,
        chunk.source_name,
        chunk_cap_bytes=MAX_CHUNK_BYTES if chunk.kind == "csv" else 0,
    )


def _measure_in_parent(spec: WorkerSpec, chunk: Chunk | None) -> dict[str, int]:
    """``measure_in_worker``'s figures for the thread executors, taken in this process: the
    peak RSS (VmHWM, reset first through /proc/self/clear_refs) over one chunk, above the
    RSS after a warm-up chunk. Where the peak cannot be reset, the RSS after the chunk."""
    if chunk is None:
        return {"base": 0}
    init_worker(spec)
    try:
        run_chunk(head(chunk, WARM_ROWS))
        base = psutil.Process().memory_info().rss
        reset = _reset_peak_rss()
        result = run_chunk(chunk)
        peak = _peak_rss() if reset else psutil.Process().memory_info().rss
        frame = int(decode_chunk(chunk, spec.read, "skip")[0].memory_usage(deep=True).sum())
    except ETLError as e:  # the run itself reports bad input, with context
        log.info("could not measure a chunk (%s); using estimates", e, extra={"stage": "plan"})
        return {"base": 0}
    return {"base": 0, "work": max(peak - base, 0), "frame": frame, "result": result.nbytes}


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return psutil.Process().memory_info().rss


def _staged_copy(cfg: JobConfig, src: Source) -> Source | None:
    """The copy an earlier run staged (a cron rerun): measured without a request."""
    path = cfg.staging_dir / src.name
    return Source(src.index, str(path), src.name, src.format) if path.is_file() else None


def _remote_sample(cfg: JobConfig, src: Source, folder: Path) -> Source | None:
    """The head of a remote CSV/JSONL source as a local file to measure; None when it
    cannot be had (the run itself reports an unreachable source, with context)."""
    if not can_sample_head(src):
        return None
    try:
        raw = asyncio.run(fetch_head(cfg.download, src, REMOTE_SAMPLE_BYTES))
        return sample_from_head(raw, src, folder)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, zlib.error) as e:
        log.info("could not sample %s (%s); using estimates", src.name, e, extra={"stage": "plan"})
        return None


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:  # exited between listing and reading
        return 0


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


def _leaves(e: BaseException) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            yield from _leaves(sub)
    else:
        yield e


async def run_job(cfg: JobConfig, opts: RunOptions | None = None) -> RunSummary:
    return await Run(cfg, opts or RunOptions()).execute()

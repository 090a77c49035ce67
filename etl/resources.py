"""Size the run to the machine and the memory it is given, then keep it inside at run time.

1. **Know the machine** (``machine``): usable CPUs are the affinity mask capped by the
   cgroup CPU quota; usable memory is the lower of the cgroup memory limit and what
   psutil says is available (inside a container psutil alone reports the host).
2. **A budget** (``memory_budget``): ``resources.memory_limit`` as bytes, a share of
   usable memory, or ``auto``: ``AUTO_MEMORY_SHARE`` of usable memory, at most
   ``AUTO_BYTES_PER_CPU`` per usable CPU (1 GiB on a 2-CPU host).
3. **Measure** (``measure``): the parent reads the first chunk of the first local source
   (``PROBE_ROWS`` rows) and one throw-away worker, started the same way as the pool's,
   transforms it; the worker reports its RSS after start-up and its peak RSS over the chunk.
   The probe runs in a child, not in the parent, because allocators keep what they
   grew to: transforming in the parent would leave it holding the probe's peak for the
   whole run. Remote-only jobs are not downloaded early: they use ``FALLBACK_*`` costs.
4. **Plan** (``plan_for``): the most workers (up to the usable CPUs), then the largest
   chunks (halving from the default ``read.chunk_rows``), then the most reader threads,
   then the deepest queues whose worst case (every worker at its peak, every queue and
   in-flight slot full, every reader's buffers, the parent, the fork server) fits
   ``PLAN_SHARE`` of the budget. Explicitly set ``transform.workers``,
   ``transform.in_flight``, ``read.chunk_rows`` and ``read.threads`` are honoured, with a
   warning when they cannot fit. Measuring costs about a second before the run starts.
5. **Guard** (``MemoryGuard``): samples the RSS of the whole process tree every
   ``SAMPLE_INTERVAL_S``; above the high watermark the transform dispatcher takes no new
   chunk (``GatedChunks``) until the tree is below the low watermark, except that a chunk
   is always admitted when none is in flight, so the run can never stall.

Memory is counted as the sum of RSS over the tree, which counts pages shared between the
fork server and its workers once per process: an overestimate, so the budget errs safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from etl.config import JobConfig, parse_size
from etl.errors import ETLError
from etl.flow import BoundedQueue
from etl.records import Chunk, ChunkResult, Source, StagedFile

log = logging.getLogger("etl.resources")

AUTO_MEMORY_SHARE = 0.5  # "auto": half of usable memory leaves the rest to the page cache and neighbours on a shared host
AUTO_BYTES_PER_CPU = 512 << 20  # "auto" cap per usable CPU: past it memory buys queue depth, not speed
CGROUP_UNLIMITED = 1 << 60  # v1 writes "no limit" as ~2**63 rounded to a page; no real limit is this big
PROBE_ROWS = 50_000  # rows measured before the run: bigger is a truer per-row cost, but a slower start
PROBE_READ_ROWS = 200_000  # rows read to measure a reader: its buffers keep growing over the first few blocks
READER_SLACK = 1.5  # a reader's RSS creeps up past the probe over a long file (measured: ~130 -> ~200 MiB by 4M rows)
WARM_ROWS = 1_000  # rows run first in the probe worker so lookup tables and imports are in its baseline
MIN_CHUNK_ROWS = 10_000  # smallest chunk the planner picks: smaller means many tiny output files
ALLOCATOR_SLACK = 1.25  # measured per-row peaks scaled to bigger chunks, plus allocator fragmentation
CHUNK_SIZE_SLACK = 1.25  # chunks of the same row count differ in bytes (wide text rows); queue bytes allow this
PLAN_SHARE = 0.80  # share of the budget the plan fills: the rest below HIGH_WATERMARK absorbs what the
# estimate misses (reader buffers creeping over long files, allocator retention), so the guard stays idle
HIGH_WATERMARK = 0.90  # share of the budget above which the guard admits no new chunk
LOW_WATERMARK = 0.75  # the guard admits again below this share: the gap stops it flapping every sample
SAMPLE_INTERVAL_S = 0.2  # RSS sampling period: shorter catches briefer peaks, costs ~1 ms of CPU per sample
FALLBACK_CHUNK_BYTES_PER_ROW = 320  # remote-only jobs: ~2.5x the taxi data's 130 B/row, for wider rows
FALLBACK_WORK_BYTES_PER_ROW = 2560  # ~2.5x the taxi job's ~1 KiB/row; too high only costs smaller chunks
FALLBACK_RESULT_BYTES_PER_ROW = 128  # ~4x the taxi job's zstd Parquet
FALLBACK_READER_BYTES = 200 << 20  # a reader thread's decompression and parse buffers, after a long file
MAX_WORKERS_REPORTED = 256  # "budget allows N workers" is counted up to this


# ------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class Machine:
    cpus: int
    """Usable CPUs: affinity mask, capped by the cgroup quota."""
    memory: int
    """Usable bytes: the lower of the cgroup limit and available memory."""
    affinity_cpus: int
    cgroup_cpus: float | None
    cgroup_memory: int | None
    available: int


def machine(root: Path = Path("/")) -> Machine:
    quota, limit = cgroup_limits(root)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = max(1, min(affinity, math.ceil(quota))) if quota else affinity
    available = psutil.virtual_memory().available
    memory = min(available, limit) if limit else available
    return Machine(cpus, memory, affinity, quota, limit, available)


def cgroup_limits(root: Path = Path("/")) -> tuple[float | None, int | None]:
    """(CPU quota in CPUs, memory limit in bytes) of this process's cgroup; None = no limit.

    ``root`` is ``/`` or a fixture folder holding ``proc/self/cgroup`` and ``sys/fs/cgroup``.
    Both v1 and v2 hierarchies are read (hybrid hosts have both). The cgroup's folder is
    looked up from ``/proc/self/cgroup`` and every ancestor up to the mount point is read
    too, because a parent's limit binds its children; inside a container the folder is
    often the mount point itself, while ``/proc/self/cgroup`` still names the host path.
    """
    quotas: list[float] = []
    limits: list[int] = []
    for base, rel in _cgroup_dirs(root):
        for folder in _up_to(base, rel):
            if (q := _cpu_quota(folder)) is not None:
                quotas.append(q)
            if (m := _memory_limit(folder)) is not None:
                limits.append(m)
    return (min(quotas) if quotas else None), (min(limits) if limits else None)


def _cgroup_dirs(root: Path) -> list[tuple[Path, str]]:
    """(mount point, path inside it) for the v2 hierarchy and the v1 cpu and memory ones."""
    fs = root / "sys/fs/cgroup"
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and not controllers:
            found.append((fs if (fs / "cgroup.controllers").exists() else fs / "unified", rel))
        elif {"cpu", "memory"} & set(controllers.split(",")):
            found.append((fs / controllers, rel))
    return found


def _up_to(base: Path, rel: str) -> list[Path]:
    parts = [p for p in rel.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_quota(folder: Path) -> float | None:
    if (text := _read(folder / "cpu.max")) is not None:  # v2: "max 100000" or "150000 100000"
        quota, _, period = text.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    quota_us, period_us = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota_us is None or period_us is None or int(quota_us) <= 0:  # v1: -1 means no quota
        return None
    return int(quota_us) / int(period_us)


def _memory_limit(folder: Path) -> int | None:
    text = _read(folder / "memory.max")  # v2: "max" or bytes
    if text is None:
        text = _read(folder / "memory.limit_in_bytes")  # v1
    if text is None or text == "max":
        return None
    value = int(text)
    return None if value >= CGROUP_UNLIMITED else value


def memory_budget(setting: str, usable: int, cpus: int) -> int:
    """Bytes the run may use: ``auto``, a share (``60%``) or a size (``4GiB``)."""
    if setting == "auto":
        return int(min(usable * AUTO_MEMORY_SHARE, AUTO_BYTES_PER_CPU * cpus))
    if setting.endswith("%"):
        return int(usable * float(setting[:-1]) / 100)
    size = parse_size(setting)
    if size > usable:
        log.warning("resources.memory_limit = %s is more than the %s usable; using %s",
                    setting, gib(usable), gib(usable), extra={"stage": "plan"})  # fmt: skip
        return usable
    return size


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------- measure


@dataclass
class Probe:
    """What one measured chunk costs; per-row figures scale it to any chunk size."""

    rows: int
    chunk_bytes: int
    """Arrow IPC bytes of the chunk: what queues and pipes hold."""
    reader_bytes: int
    """One reader thread's cost: parent RSS growth over the first ``PROBE_READ_ROWS`` rows."""
    parent_base: int
    worker_base: int
    """A worker's RSS after start-up and a warm-up chunk (imports, lookup tables)."""
    worker_work: int
    """A worker's peak RSS over the chunk, above its base."""
    frame_bytes: int = 0
    """``DataFrame.memory_usage(deep=True)`` of the decoded chunk (for the report)."""
    result_bytes: int = 0
    servers: int = 0
    """RSS of helper processes (fork server, resource tracker)."""
    measured: str = "fallback"
    """Where the figures come from: a source name, or ``fallback``."""

    def per_row(self, name: str) -> float:
        return getattr(self, name) / max(self.rows, 1)


def measure(cfg: JobConfig, sources: list[Source]) -> Probe:
    """Measure the first local source's first chunk; fall back to estimates without one."""
    parent_base = psutil.Process().memory_info().rss
    local = next((s for s in sources if not s.is_remote), None)
    chunk, reader_bytes = None, FALLBACK_READER_BYTES
    if local is not None:
        try:
            chunk, reader_bytes = _read_probe(cfg, local)
        except (ETLError, OSError) as e:  # the run itself reports bad input, with context
            log.info("could not measure %s (%s); using estimates", local.name, e, extra={"stage": "plan"})
    result = _worker_probe(cfg, chunk)
    if chunk is None or "work" not in result:
        rows = PROBE_ROWS
        return Probe(rows, FALLBACK_CHUNK_BYTES_PER_ROW * rows, reader_bytes, parent_base, result["base"],
                     FALLBACK_WORK_BYTES_PER_ROW * rows, result_bytes=FALLBACK_RESULT_BYTES_PER_ROW * rows,
                     servers=_helper_rss())  # fmt: skip
    return Probe(chunk.rows, chunk.nbytes, reader_bytes, parent_base, result["base"], result["work"],
                 result["frame"], result["result"], _helper_rss(), chunk.source_name)  # fmt: skip


def _read_probe(cfg: JobConfig, src: Source) -> tuple[Chunk | None, int]:
    from etl.formats import read_chunks

    path = Path(src.url)
    proc = psutil.Process()
    before = proc.memory_info().rss
    read = cfg.read.model_copy(update={"chunk_rows": min(cfg.read.chunk_rows, PROBE_ROWS)})
    chunks = read_chunks(StagedFile(src, path, path.stat().st_size), read)
    first, rows, peak = None, 0, before
    try:
        for chunk in chunks:  # the first chunk is the probe; the next ones grow the reader to size
            first = first or chunk
            rows += chunk.rows
            peak = max(peak, proc.memory_info().rss)
            if rows >= PROBE_READ_ROWS:
                break
    finally:
        chunks.close()
    return first, int((peak - before) * READER_SLACK)


def _worker_probe(cfg: JobConfig, chunk: Chunk | None) -> dict[str, int]:
    """Run the chunk in one worker started like the pool's; report its RSS figures."""
    from etl.transform import WorkerSpec, init_worker, mp_context

    threads = cfg.transform.executor in ("thread", "serial")
    if threads and chunk is None:
        return {"base": 0}  # threads share the parent, whose RSS is counted already
    # A thread executor has no fork server to reuse: spawn one short-lived process instead of
    # measuring in the parent, whose allocator caches (the read probe's) would hide the cost.
    ctx = multiprocessing.get_context("spawn") if threads else mp_context()
    spec = WorkerSpec(cfg.transform, cfg.output)
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=init_worker, initargs=(spec, True))
    try:
        warm = _head(chunk, WARM_ROWS) if chunk is not None else None
        found = {"base": pool.submit(_probe_base, warm).result()}
        if chunk is not None:
            found.update(pool.submit(_probe_chunk, chunk, found["base"]).result())
    except (ETLError, BrokenProcessPool, OSError) as e:  # the run itself reports these, with context
        log.info("could not measure a chunk in a worker (%s); using estimates", e, extra={"stage": "plan"})
        found = {"base": _worker_base_fallback()}
    finally:
        pool.shutdown(wait=True)
    if threads:
        found["base"] = 0  # threads share the parent, whose RSS is counted already
    return found


def _head(chunk: Chunk, rows: int) -> Chunk:
    from etl.formats import decode_ipc, encode_ipc

    table = decode_ipc(chunk.data).slice(0, rows)
    return replace(chunk, rows=table.num_rows, data=encode_ipc(table))


def _probe_base(warm: Chunk | None) -> int:
    from etl.transform import run_chunk

    if warm is not None:
        run_chunk(warm)
    return psutil.Process().memory_info().rss


def _probe_chunk(chunk: Chunk, base: int) -> dict[str, int]:
    """In the probe worker: peak RSS over one chunk (receiving it included), above ``base``."""
    import pandas as pd

    from etl.formats import decode_ipc
    from etl.transform import run_chunk

    result = run_chunk(chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    frame = decode_ipc(chunk.data).to_pandas(types_mapper=pd.ArrowDtype).memory_usage(deep=True).sum()
    return {"work": max(peak - base, 0), "frame": int(frame), "result": result.nbytes}


def _worker_base_fallback() -> int:
    return psutil.Process().memory_info().rss  # a worker imports about what the parent has


def _helper_rss() -> int:
    """RSS of the children left once the probe worker is gone: fork server, resource tracker."""
    return sum(_rss(p) for p in psutil.Process().children(recursive=True))


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:  # exited between listing and reading
        return 0


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Layout:
    workers: int
    chunk_rows: int
    queue: int
    """Chunks the chunks queue holds."""
    in_flight: int
    readers: int


@dataclass
class ResourcePlan:
    """The sizing decision; stored as plain data in the run summary."""

    workers: int
    in_flight: int
    chunk_rows: int
    read_threads: int
    chunks_queue_items: int
    chunks_queue_bytes: int
    results_queue_items: int
    results_queue_bytes: int
    budget: int
    estimated_peak: int
    worker_bytes: int
    fits: bool
    cpus: int
    usable_memory: int
    cgroup_memory: int | None
    cgroup_cpus: float | None
    decision: str
    probe: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CostModel:
    """Worst-case bytes of a layout: every worker at its peak, every queue and slot full."""

    def __init__(self, cfg: JobConfig, probe: Probe) -> None:
        self.probe = probe
        self.threads = cfg.transform.executor in ("thread", "serial")
        self.writers = cfg.output.writer_threads

    def chunk(self, rows: int) -> int:
        return int(self.probe.per_row("chunk_bytes") * rows)

    def result(self, rows: int) -> int:
        return int(self.probe.per_row("result_bytes") * rows)

    def work(self, rows: int) -> int:
        """One worker's peak above its base while it holds a chunk of ``rows`` rows."""
        return int(self.probe.per_row("worker_work") * rows * ALLOCATOR_SLACK)

    def worker(self, rows: int) -> int:
        return self.probe.worker_base + self.work(rows)

    def total(self, lay: Layout) -> int:
        c, r = self.chunk(lay.chunk_rows), self.result(lay.chunk_rows)
        readers = lay.readers * (self.probe.reader_bytes + 2 * c)  # pending table + its IPC copy
        queued = int(lay.queue * c * CHUNK_SIZE_SLACK)
        # The dispatcher keeps each in-flight chunk for retries; the pool pickles a copy to send.
        in_flight = (lay.in_flight + lay.workers) * c + (lay.in_flight + lay.workers + self.writers) * r
        parent = self.probe.parent_base + readers + queued + in_flight
        if self.threads:
            return parent + lay.workers * self.work(lay.chunk_rows)
        return parent + self.probe.servers + lay.workers * self.worker(lay.chunk_rows)


def plan_resources(cfg: JobConfig, sources: list[Source], root: Path = Path("/")) -> ResourcePlan:
    """Measure, then plan; logs the decision in one line."""
    box = machine(root)
    budget = memory_budget(cfg.resources.memory_limit, box.memory, box.cpus)
    start = time.perf_counter()
    probe = measure(cfg, sources)
    plan = plan_for(cfg, box, budget, probe)
    log.log(logging.INFO if plan.fits else logging.WARNING, "%s (measured in %.1fs)", plan.decision,
            time.perf_counter() - start, extra={"stage": "plan"})  # fmt: skip
    return plan


def plan_for(cfg: JobConfig, box: Machine, budget: int, probe: Probe) -> ResourcePlan:
    """The first layout that fits, in order of preference; the smallest one if none does."""
    model = CostModel(cfg, probe)
    target = int(budget * PLAN_SHARE)
    layouts = candidates(cfg, box.cpus)
    chosen = next((lay for lay in layouts if model.total(lay) <= target), layouts[-1])
    peak = model.total(chosen)
    fits = peak <= target
    chunk = model.chunk(chosen.chunk_rows)
    return ResourcePlan(
        workers=chosen.workers, in_flight=chosen.in_flight, chunk_rows=chosen.chunk_rows, read_threads=chosen.readers,
        chunks_queue_items=chosen.queue, chunks_queue_bytes=max(int(chosen.queue * chunk * CHUNK_SIZE_SLACK), 1),
        results_queue_items=max(2, chosen.in_flight),
        results_queue_bytes=max(int(max(2, chosen.in_flight) * model.result(chosen.chunk_rows) * CHUNK_SIZE_SLACK), 1),
        budget=budget, estimated_peak=peak, worker_bytes=model.worker(chosen.chunk_rows), fits=fits,
        cpus=box.cpus, usable_memory=box.memory, cgroup_memory=box.cgroup_memory, cgroup_cpus=box.cgroup_cpus,
        decision=_decision(cfg, box, budget, model, chosen, fits), probe=asdict(probe),
    )  # fmt: skip


def candidates(cfg: JobConfig, cpus: int) -> list[Layout]:
    """Layouts from most to least preferred: workers, then chunk size, then reader threads, then
    queue depth. Readers go before chunk size: each costs ~100 MiB of parse buffers, and one
    reader usually keeps two workers fed, while small chunks mean many small output files."""
    t = cfg.transform
    if t.executor == "serial":
        workers = [1]
    elif isinstance(t.workers, int):
        workers = [t.workers]
    else:
        workers = list(range(cpus, 0, -1))
    rows = [cfg.read.chunk_rows]
    if "chunk_rows" not in cfg.read.model_fields_set:  # the default may shrink; a chosen size stays
        while rows[-1] // 2 >= MIN_CHUNK_ROWS:
            rows.append(rows[-1] // 2)
    readers = [cfg.read.threads]
    if "threads" not in cfg.read.model_fields_set:
        readers = list(range(cfg.read.threads, 0, -1))
    out = []
    for w in workers:
        depths = [(w, 2 * w), (1, w + 1), (1, w)]
        if isinstance(t.in_flight, int):
            depths = [(w, t.in_flight), (1, t.in_flight)]
        for r in rows:
            for n in readers:
                out += [Layout(w, r, q, f, n) for q, f in dict.fromkeys(depths)]
    return out


def _decision(cfg: JobConfig, box: Machine, budget: int, model: CostModel, lay: Layout, fits: bool) -> str:
    target = int(budget * PLAN_SHARE)
    extra = lay.in_flight - lay.workers
    allows = 0
    while allows < MAX_WORKERS_REPORTED and model.total(replace(lay, workers=allows + 1,
                                                                in_flight=allows + 1 + extra)) <= target:  # fmt: skip
        allows += 1
    each = model.work(lay.chunk_rows) if model.threads else model.worker(lay.chunk_rows)
    text = (f"transform: {lay.workers} workers ({box.cpus} CPUs usable; budget {gib(budget)} allows "
            f"{allows} at {gib(each)} each), chunk {lay.chunk_rows:,} rows, queues {lay.queue}, "
            f"in flight {lay.in_flight}, {lay.readers} readers; worst case {gib(model.total(lay))}")  # fmt: skip
    if not fits:
        text += (f"; does not fit {gib(target)} ({PLAN_SHARE:.0%} of the budget): lower "
                 "transform.workers or read.chunk_rows, or raise resources.memory_limit; "
                 "the memory guard will hold chunks back")  # fmt: skip
    return text


# --------------------------------------------------------------------------- guard


class MemoryGuard:
    """Samples the process tree's RSS; tells the dispatcher when it may take a chunk."""

    def __init__(self, budget: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.high = int(budget * HIGH_WATERMARK)
        self.low = int(budget * LOW_WATERMARK)
        self.interval = interval
        self.rss = 0
        self.peak = 0
        self.samples = 0
        self.paused = False
        self.pauses = 0
        self.paused_s = 0.0
        self.forced = 0
        self._tick = asyncio.Condition()
        self._proc = psutil.Process()

    def tree_rss(self) -> int:
        return _rss(self._proc) + sum(_rss(p) for p in self._proc.children(recursive=True))

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    async def sample(self) -> int:
        rss = await asyncio.to_thread(self.tree_rss)
        self.rss, self.peak, self.samples = rss, max(self.peak, rss), self.samples + 1
        if not self.paused and rss > self.high:
            self.paused = True
            self.pauses += 1
            log.info("memory %s above the high watermark %s: holding chunks back", gib(rss), gib(self.high),
                     extra={"stage": "transform"})  # fmt: skip
        elif self.paused and rss < self.low:
            self.paused = False
        async with self._tick:
            self._tick.notify_all()
        return rss

    async def admit(self, busy: Callable[[], int]) -> None:
        """Return when a chunk may start: memory is low enough, or nothing else is running."""
        if not self.paused:
            return
        start = time.perf_counter()
        async with self._tick:
            await self._tick.wait_for(lambda: not self.paused or busy() <= 0)
        self.paused_s += time.perf_counter() - start
        if self.paused:
            self.forced += 1
            if self.forced == 1:
                log.warning("memory %s is above %s with no chunk in flight: running chunks one at a "
                            "time (the run's fixed cost plus one chunk needs more than the budget; "
                            "lower read.chunk_rows or raise resources.memory_limit)", gib(self.rss), gib(self.high),
                            extra={"stage": "transform"})  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak, "samples": self.samples, "high_watermark": self.high,
                "low_watermark": self.low, "pauses": self.pauses, "paused_seconds": round(self.paused_s, 3),
                "forced_admits": self.forced}  # fmt: skip


class GatedChunks:
    """The chunks queue as the transform dispatcher sees it: ``get`` first asks the guard.

    A chunk is busy from the moment it is taken until its result is on the results queue,
    so ``busy`` is chunks taken minus results put.
    """

    def __init__(self, chunks: BoundedQueue[Chunk], results: BoundedQueue[ChunkResult], guard: MemoryGuard) -> None:
        self.chunks, self.results, self.guard = chunks, results, guard
        self.taken = 0

    def busy(self) -> int:
        return self.taken - self.results.stats.items

    async def get(self) -> Chunk | None:
        await self.guard.admit(self.busy)
        chunk = await self.chunks.get()
        if chunk is not None:
            self.taken += 1
        return chunk

"""Size the run to the machine and the memory it is given: the sizing decision.

1. **Know the machine** (``etl.core.machine``): usable CPUs are the affinity mask capped
   by the cgroup CPU quota; usable memory is the lower of the cgroup memory limit and
   what psutil says is available (inside a container psutil alone reports the host).
2. **A budget** (``memory_budget``): ``resources.memory_limit`` as bytes, a share of
   usable memory, or ``auto``: ``AUTO_MEMORY_SHARE`` of usable memory, at most
   ``AUTO_BYTES_PER_CPU`` per usable CPU (1 GiB on a 2-CPU host).
3. **Measure** (``Probe``, taken by ``etl.run.pipeline.measure``): what one chunk costs in a
   worker, and what a reader thread costs, measured in a throw-away worker before the run.
   A job whose sources are all remote is measured on the copy of its first source an
   earlier run staged, else on its first ``REMOTE_SAMPLE_BYTES``; when no chunk can be
   had the ``FALLBACK_*`` costs (~2.5x the benchmark job's, so small chunks) are used.
4. **Plan** (``plan_for``): the most workers (up to the usable CPUs), then the largest
   chunks (halving from the default ``read.chunk_rows``), then the most reader threads,
   then the deepest queues whose worst case (every worker at its peak, every queue and
   in-flight slot full, every reader's buffers, the parent, the fork server) fits
   ``PLAN_SHARE`` of the budget. Explicitly set ``transform.workers``,
   ``transform.in_flight``, ``read.chunk_rows`` and ``read.threads`` are honoured, with a
   warning when they cannot fit. Measuring costs about a second before the run starts.
5. **Guard** (``etl.run.memguard.MemoryGuard``): keeps the running job inside the budget.

Memory is counted as the sum of RSS over the tree, which counts pages shared between the
fork server and its workers once per process: an overestimate, so the budget errs safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from etl.core.config import JobConfig
from etl.core.machine import Machine, machine
from etl.core.units import parse_size

log = logging.getLogger("etl.resources")

AUTO_MEMORY_SHARE = (
    0.5  # "auto": half of usable memory leaves the rest to the page cache and neighbours on a shared host
)
AUTO_BYTES_PER_CPU = 512 << 20  # "auto" cap per usable CPU: past it memory buys queue depth, not speed
MIN_CHUNK_ROWS = 10_000  # smallest chunk the planner picks: smaller means many tiny output files
MIN_CHUNK_BYTES = 4 << 20  # ... unless its rows are wide: chunks are halved below MIN_CHUNK_ROWS while they
# hold at least this much (20 KB rows: down to ~200 rows); smaller means more per-chunk overhead
ALLOCATOR_SLACK = 1.25  # measured per-row peaks scaled to bigger chunks, plus allocator fragmentation
IN_PARENT_SLACK = 1.5  # thread executors are measured in the parent, whose allocator reuses what
# the sample read left behind: measured 1.3x under the run's own peak over HTTP at 300 MiB, so scaled up
SOLO_CHUNK_FACTOR = 2.0  # a chunk this many times the planned size runs alone (etl.run.memguard): a long
# record; lower sends more chunks alone (slower), higher lets a big one run beside workers at their peak
# Results queue items when workers write their pieces to files (every executor but Dask): a
# result is then a few hundred bytes, so a longer queue costs no memory and lets the workers go
# on while the writer threads encode a burst of row groups; it only lets the spool run further ahead.
FILED_RESULTS_ITEMS = 16
CHUNK_SIZE_SLACK = 1.25  # chunks of the same row count differ in bytes (wide text rows); queue bytes allow this
ENCODE_FACTOR = 3.0  # a writer thread encoding a Parquet row group holds ~3x its Arrow bytes (its rows
# mapped from the spool, their concatenated copy, the encoder's dictionaries and pages): measured +34 MiB
# of encoder and copies beside the mapped rows for a 131,072-row, 15 MiB group of the benchmark job (the
# encoder alone: 0.9x with a dictionary on every column, 0.65x with b20b47d's choice); lower lets the
# plan pass the budget, higher gives small budgets smaller chunks
PLAN_SHARE = 0.80  # share of the budget the plan fills: the rest below HIGH_WATERMARK absorbs what the
# estimate misses (reader buffers creeping over long files, allocator retention), so the guard stays idle
MAX_WORKERS_REPORTED = 256  # "budget allows N workers" is counted up to this
# The parent's RSS guessed before it has loaded anything (~150-200 MiB once it has): higher only
# means a run whose budget is near the process floor starts its fork server when it needs it.
EARLY_PARENT_RSS = 256 << 20
PROCESS_FLOOR = 3  # parent + fork server + one worker, each ~ the parent's RSS (pandas, pyarrow): below
# this many parents' worth of budget, worker processes cannot fit and the transform runs in the parent


# --------------------------------------------------------------------------- probe

PROBE_ROWS = 50_000  # rows measured before the run: bigger is a truer per-row cost, but a slower start
PROBE_READ_ROWS = 200_000  # rows read to measure a reader: its buffers keep growing over the first few blocks
READER_SLACK = 1.5  # a reader's RSS creeps up past the probe over a long file (measured: ~130 -> ~200 MiB by 4M rows)
REMOTE_SAMPLE_BYTES = 4 << 20  # fetched from a remote-only job to measure a chunk (~50k rows of gzip CSV):
# more is a truer per-row cost, but a slower start
FALLBACK_CHUNK_BYTES_PER_ROW = 320  # remote-only jobs: ~2.5x the taxi data's 130 B/row, for wider rows
FALLBACK_WORK_BYTES_PER_ROW = 2560  # ~2.5x the taxi job's ~1 KiB/row; too high only costs smaller chunks
FALLBACK_RESULT_BYTES_PER_ROW = 128  # ~4x the taxi job's zstd Parquet
FALLBACK_READER_BYTES = 200 << 20  # a reader thread's decompression and parse buffers, after a long file


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
    chunk_cap_bytes: int = 0
    """Text a chunk holds at most (CSV cut by the readers: ``etl.read.csv_cut.MAX_CHUNK_BYTES``),
    so wide rows make chunks of fewer rows than ``read.chunk_rows``; 0: no cap (Arrow chunks)."""

    def per_row(self, name: str) -> float:
        total: int = getattr(self, name)
        return total / max(self.rows, 1)


def memory_budget(setting: str, usable: int, cpus: int) -> int:
    """Bytes the run may use: ``auto``, a share (``60%``) or a size (``4GiB``)."""
    if setting == "auto":
        return int(min(usable * AUTO_MEMORY_SHARE, AUTO_BYTES_PER_CPU * cpus))
    if setting.endswith("%"):
        return int(usable * float(setting[:-1]) / 100)
    size = parse_size(setting)
    if size > usable:
        log.warning(
            "resources.memory_limit = %s is more than the %s usable; using %s",
            setting,
            gib(usable),
            gib(usable),
            extra={"stage": "plan"},
        )
        return usable
    return size


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


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

    executor: str
    """The transform executor to run: the job's, or ``thread`` when processes cannot fit."""
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
    writer_threads: int = 2
    """Threads encoding output row groups: the job's, or one when processes cannot fit."""
    solo_chunk_bytes: int = 0
    """A chunk bigger than this runs with no other in flight (``SOLO_CHUNK_FACTOR`` times the
    planned chunk's bytes): its worker's peak, several times its size, is not in the plan."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CostModel:
    """Worst-case bytes of a layout: every worker at its peak, every queue and slot full."""

    def __init__(self, cfg: JobConfig, probe: Probe) -> None:
        self.probe = probe
        self.threads = cfg.transform.executor in ("thread", "serial")
        self.dask = cfg.transform.executor == "dask"
        self.writers = cfg.output.writer_threads
        self.row_group_rows = cfg.output.row_group_size

    def held(self, rows: int) -> int:
        """Rows a chunk of ``rows`` rows really holds: wide rows reach the chunk's byte cap
        first (20 KB rows: 1,678 rows in 32 MiB, not 100,000 rows in 2 GB)."""
        per_row = self.probe.per_row("chunk_bytes")
        if self.probe.chunk_cap_bytes and per_row > 0:
            return max(min(rows, int(self.probe.chunk_cap_bytes / per_row)), 1)
        return rows

    def chunk(self, rows: int) -> int:
        return int(self.probe.per_row("chunk_bytes") * self.held(rows))

    def result(self, rows: int) -> int:
        return int(self.probe.per_row("result_bytes") * self.held(rows))

    def work(self, rows: int) -> int:
        """One worker's peak above its base while it holds a chunk of ``rows`` rows."""
        slack = ALLOCATOR_SLACK * (IN_PARENT_SLACK if self.threads else 1.0)
        return int(self.probe.per_row("worker_work") * self.held(rows) * slack)

    def worker(self, rows: int) -> int:
        return self.probe.worker_base + self.work(rows)

    def encode(self) -> int:
        """The writer threads' encode: each holds one row group (``output.row_group_size``
        rows of the result's Arrow bytes per row, at most ``ROW_GROUP_MAX_BYTES``) times
        ``ENCODE_FACTOR`` while it encodes it, whatever the chunk size.

        Counted in the worst case of the in-parent executors (thread, serial) only. Their
        budgets are the small ones (``in_process_if_small``), where this fixed cost (45 MiB
        for one writer of the benchmark job) is most of what ``PLAN_SHARE`` leaves for the
        estimate's misses: uncounted, the 300 MiB run peaked at 270-304 MiB against a worst
        case of 232; counted, the plan halves the chunks and the run peaks at ~240. A process
        plan has at least ``PROCESS_FLOOR`` parents' worth of budget, whose headroom (above
        100 MiB) has so far held the encode (1 GiB: 906 MiB against a worst case of 818);
        counting it there too would shrink the default plans of every job."""
        from etl.core.parts import ROW_GROUP_MAX_BYTES  # pandas: this module stays light for keeps_workers

        group = min(self.probe.per_row("result_bytes") * self.row_group_rows, ROW_GROUP_MAX_BYTES)
        return int(self.writers * ENCODE_FACTOR * group)

    def total(self, lay: Layout) -> int:
        c, r = self.chunk(lay.chunk_rows), self.result(lay.chunk_rows)
        readers = lay.readers * (self.probe.reader_bytes + 2 * c)  # pending table + its IPC copy
        queued = int(lay.queue * c * CHUNK_SIZE_SLACK)
        if self.dask:  # each in-flight chunk kept for retries and a serialized copy sent; rows come back
            in_flight = (lay.in_flight + lay.workers) * c + (lay.in_flight + lay.workers + self.writers) * r
        else:  # kept for retries, sent without a copy (send_chunk); a result names its spooled pieces
            in_flight = lay.in_flight * c
        parent = self.probe.parent_base + readers + queued + in_flight
        if self.threads:  # the encode beside the chunks in the parent: see ``encode``
            return parent + self.encode() + lay.workers * self.work(lay.chunk_rows)
        return parent + self.probe.servers + lay.workers * self.worker(lay.chunk_rows)


def plan_resources(cfg: JobConfig, measure: Callable[[JobConfig], Probe], root: Path = Path("/")) -> ResourcePlan:
    """Measure (``measure(cfg)``, for the executor this budget allows), then plan; logs the
    decision in one line."""
    box = machine(root)
    budget = memory_budget(cfg.resources.memory_limit, box.memory, box.cpus)
    start = time.perf_counter()
    cfg, note = in_process_if_small(cfg, budget)
    probe = measure(cfg)
    plan = plan_for(cfg, box, budget, probe)
    plan.decision = note + plan.decision
    log.log(
        logging.INFO if plan.fits else logging.WARNING,
        "%s (measured in %.1fs)",
        plan.decision,
        time.perf_counter() - start,
        extra={"stage": "plan"},
    )
    return plan


def keeps_workers(cfg: JobConfig, root: Path = Path("/")) -> bool:
    """Whether the run will use worker processes, judged before anything is loaded or
    measured (the command line then starts their fork server early, ``etl.core.forkserver``).
    Conservative: the parent is taken at ``EARLY_PARENT_RSS``, so a budget near the line
    gets no early server, whose memory it could not afford (``in_process_if_small``)."""
    t = cfg.transform
    if t.executor != "process":
        return False
    if "executor" in t.model_fields_set or t.workers != "auto":
        return True
    box = machine(root)
    return (
        memory_budget(cfg.resources.memory_limit, box.memory, box.cpus) * PLAN_SHARE >= PROCESS_FLOOR * EARLY_PARENT_RSS
    )


def in_process_if_small(cfg: JobConfig, budget: int) -> tuple[JobConfig, str]:
    """The job to plan for: a budget too small for any worker process (``PROCESS_FLOOR``
    times the parent's RSS) runs the transform in the parent's threads, unless the
    executor or the worker count was chosen explicitly; decided before any process starts."""
    t = cfg.transform
    floor = PROCESS_FLOOR * psutil.Process().memory_info().rss
    if (
        t.executor != "process"
        or "executor" in t.model_fields_set
        or t.workers != "auto"
        or budget * PLAN_SHARE >= floor
    ):
        return cfg, ""
    note = (
        f"budget {gib(budget)} has no room for worker processes (a fork server and one worker need "
        f"{gib(floor)} with this process): transform runs in this process's threads; "
    )
    update: dict[str, Any] = {"transform": t.model_copy(update={"executor": "thread"})}
    if "writer_threads" not in cfg.output.model_fields_set:
        # Encoding a row group needs ~3x its Arrow bytes (the spooled rows mapped, the
        # Parquet encoder's dictionaries and pages: 50 MiB for 131,072 rows of the benchmark
        # job): two at once took a 300 MiB run to 300-330 MiB, one kept it at 255-290.
        update["output"] = cfg.output.model_copy(update={"writer_threads": 1})
        note += "one writer thread; "
    return cfg.model_copy(update=update), note


def plan_for(cfg: JobConfig, box: Machine, budget: int, probe: Probe) -> ResourcePlan:
    """The first layout that fits, in order of preference; the smallest one if none does."""
    model = CostModel(cfg, probe)
    target = int(budget * PLAN_SHARE)
    layouts = candidates(cfg, box.cpus, model.chunk)
    chosen = next((lay for lay in layouts if model.total(lay) <= target), layouts[-1])
    peak = model.total(chosen)
    fits = peak <= target
    chunk = model.chunk(chosen.chunk_rows)
    return ResourcePlan(
        executor=cfg.transform.executor,
        workers=chosen.workers,
        in_flight=chosen.in_flight,
        chunk_rows=chosen.chunk_rows,
        read_threads=chosen.readers,
        chunks_queue_items=chosen.queue,
        chunks_queue_bytes=max(int(chosen.queue * chunk * CHUNK_SIZE_SLACK), 1),
        results_queue_items=max(2, chosen.in_flight, 0 if cfg.transform.executor == "dask" else FILED_RESULTS_ITEMS),
        results_queue_bytes=max(int(max(2, chosen.in_flight) * model.result(chosen.chunk_rows) * CHUNK_SIZE_SLACK), 1),
        budget=budget,
        estimated_peak=peak,
        worker_bytes=model.worker(chosen.chunk_rows),
        fits=fits,
        cpus=box.cpus,
        usable_memory=box.memory,
        cgroup_memory=box.cgroup_memory,
        cgroup_cpus=box.cgroup_cpus,
        decision=_decision(cfg, box, budget, model, chosen, fits),
        probe=asdict(probe),
        writer_threads=cfg.output.writer_threads,
        solo_chunk_bytes=int(SOLO_CHUNK_FACTOR * CHUNK_SIZE_SLACK * chunk),
    )


def candidates(cfg: JobConfig, cpus: int, chunk_bytes: Callable[[int], int] | None = None) -> list[Layout]:
    """Layouts from most to least preferred: workers, then chunk size, then reader threads, then
    queue depth. Readers go before chunk size: each costs ~100 MiB of parse buffers, and one
    reader usually keeps two workers fed, while small chunks mean many small output files.
    ``chunk_bytes`` (a chunk's bytes by its rows): wide rows halve on below ``MIN_CHUNK_ROWS``
    while a chunk holds at least ``MIN_CHUNK_BYTES``."""
    t = cfg.transform
    if t.executor == "serial":
        workers = [1]
    elif isinstance(t.workers, int):
        workers = [t.workers]
    else:
        workers = list(range(cpus, 0, -1))
    rows = [cfg.read.chunk_rows]
    if "chunk_rows" not in cfg.read.model_fields_set:  # the default may shrink; a chosen size stays
        while rows[-1] // 2 >= MIN_CHUNK_ROWS or (
            chunk_bytes is not None and rows[-1] > 1 and chunk_bytes(rows[-1] // 2) >= MIN_CHUNK_BYTES
        ):
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
    while (
        allows < MAX_WORKERS_REPORTED
        and model.total(replace(lay, workers=allows + 1, in_flight=allows + 1 + extra)) <= target
    ):
        allows += 1
    each = model.work(lay.chunk_rows) if model.threads else model.worker(lay.chunk_rows)
    held = model.held(lay.chunk_rows)
    capped = f" (wide rows: {held:,} in {gib(model.probe.chunk_cap_bytes)} of text)" if held < lay.chunk_rows else ""
    plural = "s" if model.writers > 1 else ""
    writers = f", {model.writers} writer{plural} encoding {gib(model.encode())}" if model.threads else ""
    text = (
        f"transform: {lay.workers} workers ({box.cpus} CPUs usable; budget {gib(budget)} allows "
        f"{allows} at {gib(each)} each), chunk {lay.chunk_rows:,} rows{capped}, queues {lay.queue}, "
        f"in flight {lay.in_flight}, {lay.readers} readers{writers}; worst case {gib(model.total(lay))}"
    )
    if not fits:
        text += (
            f"; does not fit {gib(target)} ({PLAN_SHARE:.0%} of the budget): lower "
            f"transform.workers{', output.writer_threads' if model.threads else ''} or read.chunk_rows, "
            "or raise resources.memory_limit; "
            "the memory guard will hold chunks back"
        )
    return text

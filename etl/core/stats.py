"""Per-stage statistics for every run: where the time went, and which stage limits the run.

Accounting model (slot-seconds). Each stage has ``slots`` units of capacity: download 1
(metered as one unit: its input list is there from the start), read ``read.threads``,
transform the worker count, write ``output.writer_threads``. At every instant each slot is
in exactly one state, integrated over the stage's wall time by ``StageMeter``:

* **busy**: working on an item (download: fetching; read: parsing a file, from the open to
  the last chunk; transform: a chunk submitted to the executor and not yet returned, IPC
  included, at most ``workers`` at once; write: writing a result's parts);
* **blocked**: holding a finished item while the downstream queue is full (the stage
  downstream is slower). Busy wins when both apply: a transform worker computing one chunk
  while another chunk's result waits is busy;
* **wait**: idle, waiting for input (the stage upstream is slower).

Reported seconds are slot-seconds divided by ``slots``, so ``busy + wait + blocked`` equals
the stage's wall time and a busy share never passes 100%.

Bottleneck rule: the stage with the highest busy share of the run's wall time; when two
stages are within ``TIE_SHARE`` of each other, the one whose upstream stage was blocked
longer on the queue feeding it wins (a full queue in front of a stage is direct evidence
that the stage cannot keep up). The memory budget outranks every stage: when the memory
guard (etl/run/memguard.py) held chunks back for at least ``MEMORY_LIMIT_SHARE`` of the
run, the bottleneck is ``memory``, with the seconds held back and the budget (the busiest
stage is kept beside it): the stages were waiting on the budget, not on each other.

Process tree: ``TreeSampler`` samples the run's process and all its descendants (reader and
writer threads, the forkserver, transform workers) every ``SAMPLE_INTERVAL_S`` for peak RSS
(the sum over the tree) and CPU seconds (user + system, each process's own, summed over
every process seen; a process that exits loses at most its last interval, when it is idle).
It is the run's only sampler: each sample's tree RSS is handed to its ``listeners`` (the
memory guard, etl/memguard.py), so /proc is scanned once per interval, off the event loop.
On Linux a sample reads only the tree: each process's children from
``/proc/<pid>/task/<tid>/children`` and its CPU and RSS from one ``/proc/<pid>/stat`` (about
0.3 ms a tick for a default run's tree); elsewhere, psutil, which finds children by reading
every process on the machine (about 2 ms a tick with 77 processes, more on a busy host).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from etl.core.machine import usable_cpus

STAGES = ("download", "read", "transform", "write")
SAMPLE_INTERVAL_S = (
    0.2  # RSS/CPU sampling (and the memory guard's): shorter catches briefer peaks, costs a /proc scan each
)
TIE_SHARE = 0.05  # busy shares this close count as a tie, broken by the upstream blocked share
MEMORY_LIMIT_SHARE = 0.10  # chunks held back this share of the run make the budget the bottleneck:
# lower names brief pauses that cost little, higher hides a budget that throttles a run


# ----------------------------------------------------------------------- stage meter


@dataclass
class StageMeter:
    """Integrates busy / blocked / waiting slot-seconds; thread-safe (reader threads call it)."""

    name: str
    slots: int
    items_in: int = 0
    items_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rows_out: int = 0
    _working: int = 0
    _blocked: int = 0
    _busy_ss: float = 0.0
    _blocked_ss: float = 0.0
    _wait_ss: float = 0.0
    _start: float = 0.0
    _end: float = 0.0
    _last: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> None:
        with self._lock:
            self._start = self._last = time.perf_counter()

    def stop(self) -> None:
        with self._lock:
            self._advance(time.perf_counter())
            self._end = self._last

    def _advance(self, now: float) -> None:
        if not self._start or self._end:
            return  # outside the stage's lifetime: nothing to integrate
        dt = max(now - self._last, 0.0)
        busy = min(max(self._working, 0), self.slots)
        blocked = min(max(self._blocked, 0), self.slots - busy)
        self._busy_ss += busy * dt
        self._blocked_ss += blocked * dt
        self._wait_ss += (self.slots - busy - blocked) * dt
        self._last = now

    def _shift(self, working: int, blocked: int) -> None:
        with self._lock:
            self._advance(time.perf_counter())
            self._working += working
            self._blocked += blocked

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        self._shift(+1, 0)
        try:
            yield
        finally:
            self._shift(-1, 0)

    @contextlib.contextmanager
    def blocked(self, from_work: bool = True) -> Iterator[None]:
        """A put on the downstream queue; ``from_work``: the slot stops working meanwhile."""
        self._shift(-1 if from_work else 0, +1)
        try:
            yield
        finally:
            self._shift(+1 if from_work else 0, -1)

    def count_in(self, items: int, nbytes: int) -> None:
        with self._lock:
            self.items_in += items
            self.bytes_in += nbytes

    def count_out(self, items: int, nbytes: int, rows: int = 0) -> None:
        with self._lock:
            self.items_out += items
            self.bytes_out += nbytes
            self.rows_out += rows

    def as_dict(self, run_wall: float) -> dict[str, Any]:
        wall = max(self._end - self._start, 0.0)
        run_wall = max(run_wall, 1e-9)
        busy, wait, blocked = (x / self.slots for x in (self._busy_ss, self._wait_ss, self._blocked_ss))
        return {
            "slots": self.slots,
            "wall_s": round(wall, 4),
            "busy_s": round(busy, 4),
            "wait_s": round(wait, 4),
            "blocked_s": round(blocked, 4),
            "busy_share": round(busy / run_wall, 4),
            "wait_share": round(wait / run_wall, 4),
            "blocked_share": round(blocked / run_wall, 4),
            "items_in": self.items_in,
            "items_out": self.items_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rows_out": self.rows_out,
            "items_per_s": round(self.items_in / run_wall, 3),
            "mib_in_per_s": round(self.bytes_in / run_wall / 2**20, 3),
        }


class MeteredPut:
    """Wraps the queue a stage feeds: every put counts an item out and is metered as blocked."""

    def __init__(
        self,
        queue: Any,
        meter: StageMeter,
        *,
        from_work: bool,
        size: Callable[[Any], int] = lambda item: item.nbytes,
        rows: Callable[[Any], int] = lambda item: 0,
    ) -> None:
        self._queue, self._meter, self._from_work = queue, meter, from_work
        self._size, self._rows = size, rows

    async def put(self, item: Any) -> None:
        with self._meter.blocked(self._from_work):
            await self._queue.put(item)
        self._meter.count_out(1, self._size(item), self._rows(item))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)  # close, abort, stats: the queue's own


class MeteredExecutor:
    """Wraps a transform executor: a chunk in flight occupies a worker slot (capped at workers)."""

    def __init__(self, executor: Any, meter: StageMeter) -> None:
        self._executor, self._meter = executor, meter
        self.workers = executor.workers

    async def run(self, chunk: Any) -> Any:
        with self._meter.working():
            result = await self._executor.run(chunk)
        self._meter.count_in(1, chunk.nbytes)
        return result

    def close(self) -> None:
        self._executor.close()


# ----------------------------------------------------------------- process tree


class TreeSampler:
    """Peak RSS and CPU seconds of this process and all its descendants."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.listeners: list[Callable[[int], Awaitable[None]]] = []  # called with each sample's tree RSS
        self.peak_rss = 0
        self.samples = 0
        self._root = psutil.Process()
        self._first_cpu: dict[tuple[int, float], float] = {}
        self._last_cpu: dict[tuple[int, float], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = False

    def sample(self) -> int:
        """Take one sample (blocking: /proc reads); the tree's RSS in bytes."""
        rss = 0
        for key, cpu, mem in self._read_tree():
            rss += mem
            if not self._started:
                self._first_cpu[key] = cpu
            self._last_cpu[key] = cpu
        self._started = True
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        return rss

    def _read_tree(self) -> Iterator[tuple[tuple[int, float], float, int]]:
        """((pid, start time), CPU seconds, RSS bytes) of each process in the tree."""
        if _PROC_CHILDREN:
            todo = [self._root.pid]
            while todo:
                pid = todo.pop()
                stat = _proc_stat(pid)
                if stat is None:
                    continue  # exited since its parent listed it
                yield stat
                todo += _proc_children(pid)
            return
        for proc in [self._root, *self._children()]:
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    mem = proc.memory_info().rss
                    t = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # exited between the listing and the read
            yield key, t.user + t.system, mem

    def _children(self) -> list[psutil.Process]:
        try:
            return self._root.children(recursive=True)
        except psutil.Error:
            return []

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._first_cpu.get(k, 0.0) for k, v in self._last_cpu.items())

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="tree-sampler")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            rss = await asyncio.to_thread(self.sample)
            for listener in self.listeners:
                await listener(rss)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self.sample()


_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
"""Linux with CONFIG_PROC_CHILDREN: a process's children can be listed without a scan."""
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_stat(pid: int) -> tuple[tuple[int, float], float, int] | None:
    """((pid, start time in ticks), user + system CPU seconds, RSS bytes) from one read of
    ``/proc/<pid>/stat``; None if the process has gone (a zombie still tells its final CPU)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # the name may hold spaces and ")"
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return (pid, float(fields[19])), cpu, int(fields[21]) * _PAGE  # starttime, rss pages


def _proc_children(pid: int) -> list[int]:
    """The process's children, whichever of its threads started them."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            continue  # the thread ended since the listing
    return children


# ----------------------------------------------------------------------- the run


class RunStats:
    """The meters of one run, its process-tree sampler, and the final ``stats`` dict."""

    def __init__(self, slots: dict[str, int] | None = None) -> None:
        self.set_slots(slots or {})
        self.sampler = TreeSampler()
        self._wall_start = time.perf_counter()

    def set_slots(self, slots: dict[str, int]) -> None:
        """Each stage's capacity, known once the run is planned (the sampler may already run)."""
        self.meters = {name: StageMeter(name, max(1, slots.get(name, 1))) for name in STAGES}

    def start(self) -> None:
        self._wall_start = time.perf_counter()
        self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()

    def finish(
        self, run_wall: float, queues: list[dict[str, Any]], memory: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The ``stats`` dict; ``memory`` is the memory guard's ``as_dict()`` (chunks held back, budget)."""
        self.sampler.stop()
        cores = usable_cpus()
        cpu = self.sampler.cpu_seconds
        stages = {name: m.as_dict(run_wall) for name, m in self.meters.items()}
        return {
            "wall_seconds": round(run_wall, 4),
            "cores": cores,
            "cpu_seconds": round(cpu, 3),
            "cpu_util": round(cpu / max(run_wall, 1e-9) / cores, 4),
            "peak_rss_bytes": self.sampler.peak_rss,
            "rss_samples": self.sampler.samples,
            "stages": stages,
            "queues": [
                {
                    k: q[k]
                    for k in (
                        "name",
                        "high_items",
                        "max_items",
                        "high_bytes",
                        "max_bytes",
                        "put_blocked_s",
                        "get_wait_s",
                    )
                }
                for q in queues
            ],
            "bottleneck": bottleneck(stages, memory, run_wall),
        }


def bottleneck(
    stages: dict[str, dict[str, Any]], memory: dict[str, Any] | None = None, run_wall: float = 0.0
) -> dict[str, Any]:
    """The stage with the highest busy share; near-ties go to the one with a fuller queue in front.

    ``memory`` (the memory guard's figures) makes it ``memory`` when chunks were held back for
    ``MEMORY_LIMIT_SHARE`` of ``run_wall`` or more; the busiest stage is kept as ``busiest``."""
    stage = _busiest(stages)
    held = float((memory or {}).get("paused_seconds", 0.0))
    if stage and held >= MEMORY_LIMIT_SHARE * run_wall > 0:
        return {
            "stage": "memory",
            "busy_share": stage["busy_share"],
            "upstream_blocked_share": stage["upstream_blocked_share"],
            "held_back_s": round(held, 3),
            "held_back_share": round(held / run_wall, 4),
            "budget_bytes": int((memory or {}).get("budget", 0)),
            "peak_rss_bytes": int((memory or {}).get("peak_rss_bytes", 0)),
            "busiest": stage["stage"],
            "rule": f"the memory guard held chunks back for {MEMORY_LIMIT_SHARE:.0%} of the run or more: "
            "the budget limits the run; else the highest busy share of the run",
        }
    return stage


def _busiest(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = [n for n in STAGES if n in stages]
    if not names:
        return {}

    def upstream_blocked(name: str) -> float:
        i = names.index(name)
        return float(stages[names[i - 1]]["blocked_share"]) if i > 0 else 0.0

    top = max(float(stages[n]["busy_share"]) for n in names)
    near = [n for n in names if float(stages[n]["busy_share"]) >= top - TIE_SHARE]
    best = max(near, key=lambda n: (upstream_blocked(n), float(stages[n]["busy_share"])))
    return {
        "stage": best,
        "busy_share": stages[best]["busy_share"],
        "upstream_blocked_share": round(upstream_blocked(best), 4),
        "rule": "highest busy share of the run; near-ties (within 5 points) go to the stage "
        "whose upstream stage was blocked longer on the queue feeding it",
    }


def bottleneck_line(b: dict[str, Any]) -> str:
    if not b:
        return "bottleneck: unknown"
    if b["stage"] == "memory":
        return (
            f"bottleneck: memory budget (chunks held back {b['held_back_s']:.1f}s = {b['held_back_share']:.0%} "
            f"of the run; budget {b['budget_bytes'] / 2**20:,.0f} MiB, peak {b['peak_rss_bytes'] / 2**20:,.0f} MiB; "
            f"busiest stage {b['busiest']} at {b['busy_share']:.0%}): raise resources.memory_limit, "
            "or lower transform.workers or read.chunk_rows"
        )
    up = f", upstream blocked {b['upstream_blocked_share']:.0%} of the run" if b["stage"] != "download" else ""
    return f"bottleneck: {b['stage']} (busy {b['busy_share']:.0%}{up})"


def format_stats(stats: dict[str, Any]) -> str:
    """The compact end-of-run table (``report.format_summary`` appends it); shares are of the run."""
    if not stats:
        return ""
    mib = 2**20
    lines = [
        f"  {'stage':<10}{'slots':>5}{'wall s':>8}{'busy':>7}{'wait':>7}{'blocked':>8}"
        f"{'items in/out':>15}{'MiB in/out':>19}{'MiB/s in':>10}"
    ]
    for name, s in stats["stages"].items():
        items = f"{s['items_in']}/{s['items_out']}"
        sizes = f"{s['bytes_in'] / mib:.1f}/{s['bytes_out'] / mib:.1f}"
        lines.append(
            f"  {name:<10}{s['slots']:>5}{s['wall_s']:>8.2f}{s['busy_share']:>7.0%}{s['wait_share']:>7.0%}"
            f"{s['blocked_share']:>8.0%}{items:>15}{sizes:>19}{s['mib_in_per_s']:>10.1f}"
        )
    queues = "; ".join(
        f"{q['name']} {q['high_items']}/{q['max_items']} items, {q['high_bytes'] / mib:.1f} MiB"
        for q in stats["queues"]
    )
    lines.append(f"  queues    high-water: {queues}")
    lines.append(
        f"  process   peak RSS {stats['peak_rss_bytes'] / mib:,.0f} MiB (whole tree), "
        f"CPU {stats['cpu_seconds']:.1f}s = {stats['cpu_util']:.0%} of {stats['cores']} cores"
    )
    lines.append("  " + bottleneck_line(stats["bottleneck"]))
    return "\n".join(lines)


class ProgressSink(Protocol):
    """What a stage reports progress to (``etl.ops.progress.StageProgress``); thread-safe."""

    def update(self, items: int = 0, nbytes: int = 0) -> None: ...

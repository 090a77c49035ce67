"""Keep a running job inside its memory budget: follow the process tree's RSS, hold chunks back.

``MemoryGuard`` is told the RSS of the whole process tree by the run's sampler
(``etl.core.stats.TreeSampler``, every ``SAMPLE_INTERVAL_S``); above the high watermark the
transform dispatcher takes no new chunk (``GatedChunks``) until the tree is below the low
watermark, except that a chunk is always admitted when none is in flight, so the run can
never stall; the dispatcher is also woken when a result is out (``ReleasingPut``), so one
chunk at a time runs back to back, not one per sample. Above the low watermark the guard
first gives back what the allocators hold free (``etl.run.allocators.release_free_memory``,
at most every ``TRIM_INTERVAL_S``). The budget comes from ``etl.run.resources``'s plan.

A chunk far bigger than planned (``solo_bytes``: one record of tens of MiB, or rows much
wider than the probe's) runs alone: the dispatcher waits until no other chunk is in flight
before it sends it, and sends nothing else until it is done. Its worker needs several
times its text (measured: 190 MiB above the worker's base for one 60 MiB record, 3.2x;
4.5x for 16 MiB), which the plan, made for chunks of the planned size, does not hold
beside other workers at their peak; alone it needs the run's fixed cost and that.

Memory is counted as the sum of RSS over the tree, which counts pages shared between the
fork server and its workers once per process: an overestimate, so the budget errs safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from etl.core.queues import BoundedQueue
from etl.core.records import Chunk, ChunkResult
from etl.run.allocators import release_free_memory
from etl.run.resources import gib

log = logging.getLogger("etl.resources")  # the planner's logger: records keep their name

HIGH_WATERMARK = 0.90  # share of the budget above which the guard admits no new chunk
LOW_WATERMARK = 0.75  # the guard admits again below this share: the gap stops it flapping every sample
TRIM_INTERVAL_S = 0.5  # above the low watermark, free memory is given back at most this often: each
# trim takes 5-30 ms with threads' allocations waiting; more often holds the tree lower but costs CPU


class MemoryGuard:
    """Follows the process tree's sampled RSS; tells the dispatcher when it may take a chunk."""

    def __init__(self, budget: int, solo_bytes: int = 0) -> None:
        self.budget = budget
        self.solo_bytes = solo_bytes
        """A chunk bigger than this runs with no other chunk in flight; 0: none does."""
        self.solos = 0
        self.high = int(budget * HIGH_WATERMARK)
        self.low = int(budget * LOW_WATERMARK)
        self.rss = 0
        self.peak = 0
        self.samples = 0
        self.paused = False
        self.pauses = 0
        self.paused_s = 0.0
        self.forced = 0
        self.trims = 0
        self.trimmed_at = -TRIM_INTERVAL_S
        self._tick = asyncio.Condition()

    async def observe(self, rss: int) -> None:
        """One sample of the tree's RSS (bytes): pause or resume, wake waiting admits."""
        self.rss, self.peak, self.samples = rss, max(self.peak, rss), self.samples + 1
        now = time.perf_counter()
        if rss > self.low and now - self.trimmed_at >= TRIM_INTERVAL_S:
            self.trimmed_at, self.trims = now, self.trims + 1
            release_free_memory()  # what the allocators hold free is budget the chunks can use
        if not self.paused and rss > self.high:
            self.paused = True
            self.pauses += 1
            log.info(
                "memory %s above the high watermark %s: holding chunks back",
                gib(rss),
                gib(self.high),
                extra={"stage": "transform"},
            )
        elif self.paused and rss < self.low:
            self.paused = False
        async with self._tick:
            self._tick.notify_all()

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
                log.warning(
                    "memory %s is above %s with no chunk in flight: running chunks one at a "
                    "time (the run's fixed cost plus one chunk needs more than the budget; "
                    "lower read.chunk_rows or raise resources.memory_limit)",
                    gib(self.rss),
                    gib(self.high),
                    extra={"stage": "transform"},
                )

    async def released(self) -> None:
        """A chunk's result is out: wake admits waiting for no chunk to be in flight now,
        not at the next sample (one chunk at a time would otherwise run one per sample)."""
        async with self._tick:
            self._tick.notify_all()

    async def alone(self, busy: Callable[[], int]) -> None:
        """Return once no chunk is in flight (checked at every sample and every result)."""
        async with self._tick:
            await self._tick.wait_for(lambda: busy() <= 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "solo_chunks": self.solos,  # chunks bigger than solo_bytes, run with no other in flight
            "peak_rss_bytes": self.peak,
            "samples": self.samples,
            "high_watermark": self.high,
            "low_watermark": self.low,
            "pauses": self.pauses,
            "paused_seconds": round(self.paused_s, 3),  # chunks held back: the dispatcher waited this long
            "forced_admits": self.forced,
            "trims": self.trims,  # free memory given back to the OS above the low watermark
        }


class ReleasingPut:
    """The results queue as the transform stage sees it: every put tells the guard a chunk
    is done (``MemoryGuard.released``), so a held-back dispatcher moves on at once."""

    def __init__(self, results: Any, guard: MemoryGuard) -> None:
        self._results, self._guard = results, guard

    async def put(self, item: ChunkResult) -> None:
        await self._results.put(item)
        await self._guard.released()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._results, name)  # close, abort, stats: the queue's own


class GatedChunks:
    """The chunks queue as the transform dispatcher sees it: ``get`` first asks the guard.

    A chunk is busy from the moment it is taken until its result is on the results queue,
    so ``busy`` is chunks taken minus results put.
    """

    def __init__(self, chunks: BoundedQueue[Chunk], results: BoundedQueue[ChunkResult], guard: MemoryGuard) -> None:
        self.chunks, self.results, self.guard = chunks, results, guard
        self.taken = 0
        self.solo = False  # the last chunk taken runs alone

    def busy(self) -> int:
        return self.taken - self.results.stats.items

    async def get(self) -> Chunk | None:
        if self.solo:  # a chunk far bigger than planned is in flight: nothing beside it
            await self.guard.alone(self.busy)
            self.solo = False
        await self.guard.admit(self.busy)
        chunk = await self.chunks.get()
        if chunk is not None:
            if self.guard.solo_bytes and chunk.nbytes > self.guard.solo_bytes:
                await self.guard.alone(self.busy)  # the chunks in flight finish first
                self.solo = True
                self.guard.solos += 1
            self.taken += 1
        return chunk

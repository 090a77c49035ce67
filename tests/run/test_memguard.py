"""The runtime memory guard: watermarks, hysteresis, forced admits, and the gated chunks queue.

The guard is fed exact RSS values through ``observe`` (what the run's sampler does), so
every pause and resume below is decided by known numbers. ``GatedChunks`` is driven with
real ``BoundedQueue`` objects on the test's event loop.
"""

from __future__ import annotations

import asyncio
import logging

import psutil
import pytest

from etl.core.queues import BoundedQueue
from etl.core.records import Chunk, ChunkResult
from etl.core.stats import TreeSampler
from etl.run.memguard import (
    HIGH_WATERMARK,
    LOW_WATERMARK,
    TRIM_INTERVAL_S,
    GatedChunks,
    MemoryGuard,
    ReleasingPut,
)

WAIT_S = 5  # upper bound for something that should happen at once; never reached when green


def chunk(i: int) -> Chunk:
    return Chunk(0, "a.csv", i, row_start=i * 10, rows=10, data=b"x" * 10)


def result(i: int) -> ChunkResult:
    return ChunkResult(0, i, rows_in=10, rows_out=10)


async def settle() -> None:
    """Let woken tasks run: a few loop turns, no wall-clock wait."""
    for _ in range(5):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------- MemoryGuard


def test_watermarks_are_shares_of_the_budget() -> None:
    guard = MemoryGuard(budget=10_000)
    assert (guard.high, guard.low) == (int(10_000 * HIGH_WATERMARK), int(10_000 * LOW_WATERMARK))
    assert guard.low < guard.high < 10_000
    assert not guard.paused and guard.as_dict()["high_watermark"] == guard.high


async def test_pauses_only_strictly_above_high_and_resumes_only_strictly_below_low() -> None:
    guard = MemoryGuard(budget=1000)  # high 900, low 750
    await guard.observe(900)  # at the high watermark: not above it
    assert not guard.paused
    await guard.observe(901)
    assert guard.paused and guard.pauses == 1
    for rss in (950, 800, 750):  # still high, then between the marks, then exactly at low: held
        await guard.observe(rss)
        assert guard.paused
    await guard.observe(749)
    assert not guard.paused
    await guard.observe(800)  # between the marks coming from below: no pause (hysteresis)
    assert not guard.paused and guard.pauses == 1


async def test_each_crossing_of_the_high_watermark_counts_one_pause() -> None:
    guard = MemoryGuard(budget=1000)
    for rss in (950, 990, 960, 100, 950, 999, 10, 901):
        await guard.observe(rss)
    assert guard.pauses == 3 and guard.paused
    assert guard.samples == 8 and guard.peak == 999 and guard.rss == 901


async def test_pause_is_logged_on_the_resources_logger(caplog: pytest.LogCaptureFixture) -> None:
    guard = MemoryGuard(budget=1 << 30)
    with caplog.at_level(logging.INFO, logger="etl.resources"):
        await guard.observe(1 << 30)
    recs = [r for r in caplog.records if "high watermark" in r.getMessage()]
    assert len(recs) == 1 and recs[0].name == "etl.resources" and recs[0].stage == "transform"


async def test_a_held_admit_goes_through_when_memory_falls_below_low() -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(950)
    waiter = asyncio.create_task(guard.admit(lambda: 3))  # chunks are running: wait for memory
    await guard.observe(760)
    await settle()
    assert not waiter.done()
    await guard.observe(700)
    await asyncio.wait_for(waiter, WAIT_S)
    assert guard.forced == 0 and not guard.paused  # admitted by memory, not forced


async def test_admit_returns_at_once_when_paused_and_nothing_is_in_flight() -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(1000)
    await asyncio.wait_for(guard.admit(lambda: 0), WAIT_S)  # no new sample needed
    assert guard.paused and guard.forced == 1


async def test_forced_admits_are_counted_and_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(2000)
    with caplog.at_level(logging.WARNING, logger="etl.resources"):
        for _ in range(3):
            await asyncio.wait_for(guard.admit(lambda: 0), WAIT_S)
    assert guard.forced == 3
    warnings = [r for r in caplog.records if "no chunk in flight" in r.getMessage()]
    assert len(warnings) == 1 and "read.chunk_rows" in warnings[0].getMessage()
    d = guard.as_dict()
    assert d["forced_admits"] == 3 and d["pauses"] == 1 and d["peak_rss_bytes"] == 2000


async def test_every_waiting_admit_is_woken_by_one_sample() -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(950)
    waiters = [asyncio.create_task(guard.admit(lambda: 2)) for _ in range(4)]
    await settle()
    assert not any(w.done() for w in waiters)
    await guard.observe(10)
    await asyncio.wait_for(asyncio.gather(*waiters), WAIT_S)
    assert guard.forced == 0


async def test_as_dict_reports_every_documented_field() -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(500)
    assert guard.as_dict() == {
        "budget": 1000,
        "solo_chunks": 0,
        "peak_rss_bytes": 500,
        "samples": 1,
        "high_watermark": 900,
        "low_watermark": 750,
        "pauses": 0,
        "paused_seconds": 0.0,
        "forced_admits": 0,
        "trims": 0,
    }


# ---------------------------------------------------------------------- GatedChunks


async def queues() -> tuple[BoundedQueue[Chunk], BoundedQueue[ChunkResult]]:
    return BoundedQueue("chunks", 100, 1 << 20), BoundedQueue("results", 100, 1 << 20)


async def test_gate_passes_chunks_through_while_memory_is_low() -> None:
    chunks, results = await queues()
    guard = MemoryGuard(budget=1 << 30)
    gate = GatedChunks(chunks, results, guard)
    for i in range(3):
        await chunks.put(chunk(i))
    await chunks.close()
    got = [await asyncio.wait_for(gate.get(), WAIT_S) for _ in range(3)]
    assert [c.index for c in got] == [0, 1, 2]
    assert gate.busy() == 3
    assert await asyncio.wait_for(gate.get(), WAIT_S) is None  # end of stream: not counted as taken
    assert gate.taken == 3


async def test_busy_counts_chunks_taken_minus_results_put() -> None:
    chunks, results = await queues()
    gate = GatedChunks(chunks, results, MemoryGuard(budget=1 << 30))
    for i in range(2):
        await chunks.put(chunk(i))
        await gate.get()
    assert gate.busy() == 2
    await results.put(result(0))
    assert gate.busy() == 1
    await results.get()  # the writer taking a result does not make its chunk busy again
    assert gate.busy() == 1


async def test_gate_holds_chunks_back_over_the_high_watermark_while_chunks_are_in_flight() -> None:
    chunks, results = await queues()
    guard = MemoryGuard(budget=1000)
    gate = GatedChunks(chunks, results, guard)
    for i in range(3):
        await chunks.put(chunk(i))
    first = await asyncio.wait_for(gate.get(), WAIT_S)
    await guard.observe(950)  # over the high watermark with one chunk in flight
    held = asyncio.create_task(gate.get())
    await settle()
    assert not held.done() and len(chunks) == 2  # the chunk stays in the queue
    await guard.observe(800)  # below high, above low: still held
    await settle()
    assert not held.done()
    await guard.observe(700)  # below low: released
    second = await asyncio.wait_for(held, WAIT_S)
    assert (first.index, second.index) == (0, 1) and guard.forced == 0 and gate.busy() == 2


async def test_gate_admits_one_chunk_when_nothing_is_in_flight_so_the_run_never_stalls() -> None:
    chunks, results = await queues()
    guard = MemoryGuard(budget=1000)
    gate = GatedChunks(chunks, results, guard)
    for i in range(2):
        await chunks.put(chunk(i))
    await guard.observe(5000)  # far over the budget, and stays there
    first = await asyncio.wait_for(gate.get(), WAIT_S)  # nothing in flight: goes through alone
    assert first.index == 0 and guard.forced == 1
    held = asyncio.create_task(gate.get())
    await settle()
    assert not held.done()  # one chunk running and memory high: the next waits
    await results.put(result(0))  # that chunk's result is out: nothing in flight
    await guard.observe(5000)  # the next sample wakes the waiter
    second = await asyncio.wait_for(held, WAIT_S)
    assert second.index == 1 and guard.forced == 2 and guard.paused


async def test_a_result_out_admits_the_next_chunk_without_waiting_for_a_sample() -> None:
    """One chunk at a time runs back to back: with a sample every 100 ms and chunks of tens
    of ms, waiting for the next sample made a 300 MiB run take 67 s instead of 15."""
    chunks, results = await queues()
    guard = MemoryGuard(budget=1000)
    gate = GatedChunks(chunks, results, guard)
    out = ReleasingPut(results, guard)
    for i in range(3):
        await chunks.put(chunk(i))
    await guard.observe(5000)  # far over the budget; no other sample comes in this test
    taken = [await asyncio.wait_for(gate.get(), WAIT_S)]  # nothing in flight: it goes alone
    for i in range(2):
        held = asyncio.create_task(gate.get())
        await settle()
        assert not held.done()  # memory high and a chunk in flight: the next waits
        await out.put(result(i))  # its result is out: the next goes now, not at a sample
        taken.append(await asyncio.wait_for(held, WAIT_S))
    assert [c.index for c in taken] == [0, 1, 2]
    assert guard.forced == 3 and guard.samples == 1


async def test_free_memory_is_given_back_above_the_low_watermark_at_most_every_interval() -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(700)  # below low: nothing to do
    assert guard.trims == 0
    await guard.observe(800)
    await guard.observe(950)  # within TRIM_INTERVAL_S of the first: not again
    assert guard.trims == 1
    guard.trimmed_at -= TRIM_INTERVAL_S
    await guard.observe(800)
    assert guard.trims == 2


# ------------------------------------------------------- moved from test_resources


class Busy:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> int:
        return self.n


async def test_guard_holds_chunks_back_until_nothing_is_in_flight() -> None:
    guard = MemoryGuard(budget=1000)
    await guard.observe(950)  # above the high watermark (900)
    assert guard.paused
    busy = Busy(2)
    waiter = asyncio.create_task(guard.admit(busy))
    await guard.observe(800)  # below the high watermark, above the low one (750): still held
    await asyncio.sleep(0)
    assert guard.paused and not waiter.done()  # two chunks running and memory high: wait
    busy.n = 0
    await guard.observe(800)
    await asyncio.wait_for(waiter, 5)  # nothing running: one chunk goes through alone
    assert guard.forced == 1 and guard.peak == 950
    await guard.observe(700)  # below the low watermark: chunks flow again
    assert not guard.paused


async def test_guard_is_fed_by_the_run_sampler_with_the_tree_rss() -> None:
    sampler, guard = TreeSampler(interval=0.01), MemoryGuard(budget=1)  # any process is above this
    sampled = asyncio.Event()

    async def after(rss: int) -> None:
        sampled.set()

    sampler.listeners += [guard.observe, after]
    sampler.start()  # its first sample is taken at once, the loop's after one interval
    try:
        await asyncio.wait_for(sampled.wait(), 5)
    finally:
        sampler.stop()
    assert guard.paused and guard.samples >= 1 and 0 < guard.peak <= sampler.peak_rss


async def test_guard_admits_freely_below_the_watermark() -> None:
    guard = MemoryGuard(budget=1 << 50)
    await guard.observe(psutil.Process().memory_info().rss)
    await asyncio.wait_for(guard.admit(Busy(10)), 1)
    assert not guard.paused and guard.forced == 0 and guard.samples == 1


async def test_a_chunk_far_bigger_than_planned_runs_alone() -> None:
    chunks, results = await queues()
    guard = MemoryGuard(budget=1 << 30, solo_bytes=100)
    gate = GatedChunks(chunks, results, guard)
    await chunks.put(chunk(0))
    await chunks.put(Chunk(0, "a.csv", 1, row_start=10, rows=1, data=b"y" * 1000))  # one long record
    await chunks.put(chunk(2))
    first = await asyncio.wait_for(gate.get(), WAIT_S)
    big = asyncio.create_task(gate.get())
    await settle()
    await guard.observe(1 << 20)  # a sample: chunk 0 is still in flight
    await settle()
    assert not big.done()  # taken from the queue, not sent while another chunk runs
    await results.put(result(first.index))
    await guard.observe(1 << 20)
    assert (await asyncio.wait_for(big, WAIT_S)).index == 1 and gate.busy() == 1
    after = asyncio.create_task(gate.get())
    await settle()
    await guard.observe(1 << 20)
    await settle()
    assert not after.done()  # nothing beside the big chunk
    await results.put(result(1))
    await guard.observe(1 << 20)
    assert (await asyncio.wait_for(after, WAIT_S)).index == 2
    assert guard.solos == 1 and guard.as_dict()["solo_chunks"] == 1

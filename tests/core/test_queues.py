"""Bounded queues: bounded by items and bytes, never deadlocked, closable and abortable."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from etl.core.queues import BoundedQueue, QueueAborted


@dataclass
class Item:
    nbytes: int
    n: int = 0


async def test_put_blocks_at_item_bound_until_a_get() -> None:
    q: BoundedQueue[Item] = BoundedQueue("q", max_items=2, max_bytes=10**9)
    await q.put(Item(1))
    await q.put(Item(1))
    third = asyncio.create_task(q.put(Item(1)))
    await asyncio.sleep(0)
    assert not third.done() and len(q) == 2
    await q.get()
    await third
    assert len(q) == 2 and q.stats.high_items == 2


async def test_put_blocks_at_byte_bound() -> None:
    q: BoundedQueue[Item] = BoundedQueue("q", max_items=100, max_bytes=100)
    await q.put(Item(60))
    blocked = asyncio.create_task(q.put(Item(60)))
    await asyncio.sleep(0)
    assert not blocked.done()
    await q.get()
    await blocked
    assert q.stats.high_bytes == 60 and q.stats.put_blocked_s > 0


async def test_oversized_item_goes_through_alone() -> None:
    q: BoundedQueue[Item] = BoundedQueue("q", max_items=4, max_bytes=10)
    await asyncio.wait_for(q.put(Item(1000)), 1)  # empty queue: admitted, no deadlock
    blocked = asyncio.create_task(q.put(Item(1)))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert (await q.get()).nbytes == 1000
    await blocked


async def test_close_ends_iteration_after_draining() -> None:
    q: BoundedQueue[Item] = BoundedQueue("q", max_items=10, max_bytes=10**6)
    for i in range(3):
        await q.put(Item(1, i))
    await q.close()
    assert [item.n async for item in q] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="put after close"):
        await q.put(Item(1))


async def test_abort_releases_a_thread_blocked_on_a_full_queue() -> None:
    q: BoundedQueue[Item] = BoundedQueue("q", max_items=1, max_bytes=10**6)
    await q.put(Item(1))
    blocked_thread = asyncio.get_running_loop().run_in_executor(None, q.put_threadsafe, Item(1))
    await asyncio.sleep(0.05)
    assert not blocked_thread.done()
    q.abort()
    with pytest.raises(QueueAborted):
        await asyncio.wait_for(blocked_thread, 5)


async def test_abort_wakes_a_waiting_consumer() -> None:
    q: BoundedQueue[Item] = BoundedQueue("q", max_items=1, max_bytes=10)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.abort()
    with pytest.raises(QueueAborted):
        await asyncio.wait_for(getter, 5)


async def test_stats_count_items_and_bytes() -> None:
    q: BoundedQueue[Item] = BoundedQueue("chunks", max_items=5, max_bytes=1000)
    assert q.stats.first_put_s is None  # nothing arrived yet
    await q.put(Item(10))
    first = q.stats.first_put_s
    assert first is not None and first >= 0
    for size in (20, 30):
        await q.put(Item(size))
    assert q.stats.first_put_s == first  # the first item's arrival, kept
    s = q.stats.as_dict()
    assert (s["name"], s["items"], s["bytes"], s["high_items"], s["high_bytes"]) == ("chunks", 3, 60, 3, 60)

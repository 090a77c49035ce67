"""Bounded queues between stages, bounded in items *and* bytes, with their own statistics.

A ``BoundedQueue`` lives on the pipeline's event loop. Coroutines use ``await put()`` and
``async for item in queue``; threads use ``put_threadsafe()``, which blocks the calling
thread (never the loop) until there is room.

Contract, for every queue:

* **Bound**: ``put`` waits while the queue holds ``max_items`` items, or while adding the
  item would pass ``max_bytes``. An item larger than ``max_bytes`` on its own is still
  admitted when the queue is empty, so one huge chunk can never deadlock the run.
* **End of stream**: the single producer side calls ``close()`` once it has put its last
  item; consumers drain what is left and then their ``async for`` ends.
* **Abort**: ``abort()`` (on failure or a signal) wakes every waiter on both sides; a
  blocked ``put`` raises ``QueueAborted``, so no reader thread stays stuck on a full queue.
* **Stats**: high-water marks in items and bytes, and time spent blocked on put (the
  downstream stage is the bottleneck) and waiting on get (the upstream one is).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=Sized)


class QueueAborted(Exception):
    """The queue was aborted because the run is failing or stopping."""


@dataclass
class QueueStats:
    name: str
    max_items: int
    max_bytes: int
    items: int = 0
    bytes: int = 0
    high_items: int = 0
    high_bytes: int = 0
    put_blocked_s: float = 0.0
    get_wait_s: float = 0.0
    first_put_s: float | None = None
    """Seconds from the queue's creation (the run's start) to its first item: the stage
    downstream had nothing to do before then."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BoundedQueue(Generic[T]):
    def __init__(self, name: str, max_items: int, max_bytes: int) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"queue {name}: bounds must be >= 1, got {max_items}, {max_bytes}")
        self._items: deque[T] = deque()
        self._bytes = 0
        self._closed = False
        self._aborted = False
        self._cond = asyncio.Condition()
        self._loop = asyncio.get_running_loop()
        self._created = time.perf_counter()
        self.stats = QueueStats(name, max_items, max_bytes)

    def __len__(self) -> int:
        return len(self._items)

    def _has_room(self, size: int) -> bool:
        if not self._items:
            return True  # an oversized item goes through alone rather than deadlocking
        s = self.stats
        return len(self._items) < s.max_items and self._bytes + size <= s.max_bytes

    async def put(self, item: T) -> None:
        size = item.nbytes
        async with self._cond:
            if self._closed:
                raise RuntimeError(f"queue {self.stats.name}: put after close")
            if not self._has_room(size) and not self._aborted:
                start = time.perf_counter()
                await self._cond.wait_for(lambda: self._aborted or self._has_room(size))
                self.stats.put_blocked_s += time.perf_counter() - start
            if self._aborted:
                raise QueueAborted(self.stats.name)
            self._items.append(item)
            self._bytes += size
            s = self.stats
            if not s.items:
                s.first_put_s = round(time.perf_counter() - self._created, 4)
            s.items += 1
            s.bytes += size
            s.high_items = max(s.high_items, len(self._items))
            s.high_bytes = max(s.high_bytes, self._bytes)
            self._cond.notify_all()

    def put_threadsafe(self, item: T) -> None:
        """Put from a worker thread; blocks that thread until there is room."""
        asyncio.run_coroutine_threadsafe(self.put(item), self._loop).result()

    async def get(self) -> T | None:
        """Next item, or ``None`` once the queue is closed and drained."""
        async with self._cond:
            if not self._items and not self._closed and not self._aborted:
                start = time.perf_counter()
                await self._cond.wait_for(lambda: self._items or self._closed or self._aborted)
                self.stats.get_wait_s += time.perf_counter() - start
            if self._aborted:
                raise QueueAborted(self.stats.name)
            if not self._items:
                return None
            item = self._items.popleft()
            self._bytes -= item.nbytes
            self._cond.notify_all()
            return item

    async def __aiter__(self) -> AsyncIterator[T]:
        while (item := await self.get()) is not None:
            yield item

    async def close(self) -> None:
        async with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Wake every waiter with ``QueueAborted``; callable from the loop without awaiting."""
        self._aborted = True

        async def wake() -> None:
            async with self._cond:
                self._cond.notify_all()

        self._loop.create_task(wake())


Item = TypeVar("Item")
Item_co = TypeVar("Item_co", covariant=True)


class Gettable(Protocol[Item_co]):
    """What ``drain`` reads: a ``BoundedQueue``, or a wrapper such as the memory guard's."""

    async def get(self) -> Item_co | None: ...


Item_contra = TypeVar("Item_contra", contravariant=True)


class Puttable(Protocol[Item_contra]):
    """What a stage feeds: a ``BoundedQueue``, or a wrapper such as ``etl.core.stats.MeteredPut``."""

    async def put(self, item: Item_contra) -> None: ...

    async def close(self) -> None: ...


async def drain(queue: Gettable[Item], limit: int, handle: Callable[[Item], Awaitable[None]]) -> None:
    """Run ``handle(item)`` for every item of ``queue`` until its end of stream, at most
    ``limit`` at once. An item is taken only when a slot is free, so a busy consumer leaves
    items in the queue and its bound pushes back on the stage that feeds it. A failing
    ``handle`` ends the drain; the task group cancels the others."""
    slots = asyncio.Semaphore(limit)

    async def one(item: Item) -> None:
        try:
            await handle(item)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tg:
        while True:
            await slots.acquire()
            item = await queue.get()
            if item is None:
                break
            tg.create_task(one(item))


def in_pool(pool: Executor, work: Callable[[Item], None]) -> Callable[[Item], Awaitable[None]]:
    """``work`` run in ``pool``, awaited from the loop: a ``drain`` handler for a thread stage."""

    async def handle(item: Item) -> None:
        await asyncio.get_running_loop().run_in_executor(pool, work, item)

    return handle

"""Lean allocators: freed memory goes back to the OS instead of waiting in per-thread caches.

The default allocators trade memory for speed by keeping what is freed for reuse, and the
memory budget counts every page they keep:

* Arrow's default pool (mimalloc) keeps freed pages in per-thread heaps; a thread that
  goes idle keeps them. Measured on the 300 MiB job (4 M rows over HTTP, transform in
  the parent's threads): 60 MiB held with 0 bytes allocated.
* glibc gives each new thread its own arena, up to 8 per core, and returns little of an
  arena's freed memory: another ~40 MiB across the read, transform and write threads.

At 300 MiB that retention kept the tree above the memory guard's high watermark with no
chunk in flight, so chunks ran one at a time. With Arrow's system allocator and
``LEAN_ARENAS`` glibc arenas the same run peaked at ~280 MiB instead of ~390, and used no
more CPU (13.9 against 19-21 s: fewer chunks ran alone); at 1 GiB with worker processes
the CPU was the same within noise (12.3-13.2 s against 12.0-13.9 s, 3 runs each).

Arrow picks its default pool once, when pyarrow loads (``ARROW_DEFAULT_MEMORY_POOL``),
and glibc reads ``MALLOC_ARENA_MAX`` when a process starts, so ``use_lean_allocators()``
runs first thing in the command line (``etl.cli.main``), before anything imports pyarrow:
it sets both variables unless the user set them (theirs win), which also reaches the fork
server and its workers, and caps this process's arenas with ``mallopt``. A library caller
(``etl.run_job``) gets it from its first run: for the worker processes and glibc, and for
Arrow in its own process only if pyarrow was not imported yet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

LEAN_ARENAS = 2  # glibc arenas: fewer means more lock contention between threads allocating
# at once, more means more freed memory held (one arena per thread, up to 8 per core, by default)
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
LEAN_ENVIRONMENT = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": str(LEAN_ARENAS)}


def use_lean_allocators() -> None:
    """Lean allocators for this process and the processes it starts; the user's own
    ``ARROW_DEFAULT_MEMORY_POOL`` or ``MALLOC_ARENA_MAX`` is kept."""
    arenas_set = "MALLOC_ARENA_MAX" in os.environ
    for name, value in LEAN_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if not arenas_set:
        cap_glibc_arenas(LEAN_ARENAS)


def cap_glibc_arenas(arenas: int) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` for threads that allocate from now on; False where
    the C library is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_ARENA_MAX, arenas))


def release_free_memory() -> None:
    """Give the OS back what the allocators hold free: glibc's arenas (``malloc_trim``) and
    Arrow's pool. Takes milliseconds (5-30 ms measured on a 200 MiB heap), during which
    threads that allocate wait for the arena lock: for memory pressure, not every chunk."""
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)

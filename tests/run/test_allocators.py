"""Lean allocators, checked in fresh interpreters: what a process picks is fixed at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from etl.run.allocators import LEAN_ARENAS


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_ARENA_MAX")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_arrow_uses_the_system_allocator_here_and_in_the_processes_started_after() -> None:
    out = python(
        """
        import subprocess, sys
        from etl.run.allocators import use_lean_allocators
        use_lean_allocators()
        import pyarrow as pa
        print(pa.default_memory_pool().backend_name)
        child = "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
        """
    )
    assert out.stdout.split() == ["system", "system"]


def test_the_users_own_allocator_setting_wins() -> None:
    out = python(
        """
        from etl.run.allocators import use_lean_allocators
        use_lean_allocators()
        import os, pyarrow as pa
        print(pa.default_memory_pool().backend_name, os.environ["MALLOC_ARENA_MAX"])
        """,
        ARROW_DEFAULT_MEMORY_POOL="mimalloc",
        MALLOC_ARENA_MAX="4",
    )
    assert out.stdout.split() == ["mimalloc", "4"]


ARENAS = """
    import ctypes, sys, threading
    from etl.run.allocators import cap_glibc_arenas
    if sys.argv[1:] == ["cap"]:
        assert cap_glibc_arenas({arenas})
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    go = threading.Barrier(6)
    def work():
        go.wait()  # all six allocate at once, as the read, transform and write threads do
        for _ in range(1000):
            libc.free(libc.malloc(4096))
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas")
def test_glibc_arenas_are_capped_for_threads_started_after() -> None:
    def arenas(*args: str) -> int:
        code = textwrap.dedent(ARENAS.format(arenas=LEAN_ARENAS))
        done = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=True
        )
        return done.stderr.count("Arena ")

    assert arenas() > LEAN_ARENAS  # without the cap, threads allocating at once get arenas of their own
    assert arenas("cap") <= LEAN_ARENAS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_release_free_memory_gives_freed_heap_pages_back() -> None:
    out = python(
        """
        from etl.run.allocators import release_free_memory
        def anon():
            line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon"))
            return int(line.split()[1]) // 1024
        blocks = [bytearray(64 << 10) for _ in range(3200)]  # 200 MiB on the heap (below mmap's threshold)
        kept = blocks[::50]  # what stays alive pins the heap: freeing the rest returns nothing
        del blocks
        before = anon()
        release_free_memory()
        print(before, anon())
        """
    )
    before, after = map(int, out.stdout.split())
    assert before > 150 and before - after > 100

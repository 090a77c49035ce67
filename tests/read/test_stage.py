"""etl.read.stage: real queues on the test's event loop, real reader threads, real CSV files."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.queues import BoundedQueue
from etl.core.records import Chunk, Source, StagedFile
from etl.core.stats import StageMeter
from etl.read.formats import read_chunks
from etl.read.stage import ReadStats, read_stage
from tests.conftest import write_trips_csv


class Progress:
    """What the pipeline's progress bar gets: thread-safe sums."""

    def __init__(self) -> None:
        self.items = 0
        self.nbytes = 0
        self.calls = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def update(self, items: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.items += items
            self.nbytes += nbytes
            self.calls += 1
            self.threads.add(threading.current_thread().name)


def staged_files(folder: Path, count: int = 4, rows: int = 230) -> list[StagedFile]:
    folder.mkdir(exist_ok=True)
    out = []
    for k in range(count):
        path = folder / f"trips-{k}.csv"
        write_trips_csv(path, rows=rows + 31 * k, seed=k, start_id=1000 * k)
        out.append(StagedFile(Source(k, str(path), path.name, "csv"), path, path.stat().st_size))
    return out


async def files_queue(files: list[StagedFile], max_items: int = 100) -> BoundedQueue[StagedFile]:
    q: BoundedQueue[StagedFile] = BoundedQueue("files", max_items, 1 << 30)
    for f in files:
        await q.put(f)
    await q.close()
    return q


async def collect(q: BoundedQueue[Chunk], got: list[Chunk]) -> None:
    async for chunk in q:
        got.append(chunk)


async def run_stage(
    files: list[StagedFile],
    cfg: ReadConfig,
    *,
    chunks_max_items: int = 1000,
    admit: Callable[[StagedFile], bool] | None = None,
) -> tuple[ReadStats, list[Chunk], list[tuple[Source, int, int]], StageMeter, Progress]:
    """Run the stage with a consumer draining the chunks queue as the transform stage would."""
    files_q = await files_queue(files)
    chunks_q: BoundedQueue[Chunk] = BoundedQueue("chunks", chunks_max_items, 1 << 30)
    meter = StageMeter("read", cfg.threads)
    progress = Progress()
    got: list[Chunk] = []
    done_calls: list[tuple[Source, int, int]] = []  # (source, count, chunks of it already on the queue)
    lock = threading.Lock()

    def done(source: Source, count: int) -> None:
        with lock:
            done_calls.append((source, count, chunks_q.stats.items))

    consumer = asyncio.create_task(collect(chunks_q, got))
    extra = {} if admit is None else {"admit": admit}
    with ThreadPoolExecutor(cfg.threads, thread_name_prefix="test-reader") as pool:
        meter.start()
        stats = await read_stage(files_q, chunks_q, cfg, pool, meter=meter, progress=progress, done=done, **extra)
        meter.stop()
    await asyncio.wait_for(consumer, 30)  # ends only because the stage closed the queue
    return stats, got, done_calls, meter, progress


def expected_chunks(staged: StagedFile, cfg: ReadConfig) -> list[Chunk]:
    return list(read_chunks(staged, cfg))


@pytest.mark.parametrize("parse", ["worker", "reader"])
async def test_every_chunk_of_every_file_reaches_the_queue(tmp_path: Path, parse: str) -> None:
    files = staged_files(tmp_path / "data")
    cfg = ReadConfig(chunk_rows=40, threads=2, parse=parse)  # type: ignore[arg-type]
    stats, got, done_calls, meter, progress = await run_stage(files, cfg)

    by_source: dict[int, list[Chunk]] = {}
    for chunk in got:
        by_source.setdefault(chunk.source_index, []).append(chunk)
    assert sorted(by_source) == [0, 1, 2, 3]
    for staged in files:
        mine = by_source[staged.source.index]
        assert mine == expected_chunks(staged, cfg)  # in order within a file, nothing lost or added
        assert len(mine) > 2

    # done(source, count): once per file, with its chunk count, after its last chunk was put
    assert sorted(s.index for s, _, _ in done_calls) == [0, 1, 2, 3]
    for source, count, on_queue in done_calls:
        assert count == len(by_source[source.index])
        put_before = [c for c in got[:on_queue] if c.source_index == source.index]
        assert len(put_before) == count

    assert (stats.files, stats.bytes) == (4, sum(f.size for f in files))
    assert (meter.items_in, meter.bytes_in) == (4, sum(f.size for f in files))
    assert meter.items_out == len(got)
    assert meter.bytes_out == sum(c.nbytes for c in got)
    assert meter.rows_out == (sum(c.rows for c in got) if parse == "reader" else 0)
    # The bar counts file bytes as stored: each file's chunks carry its whole size.
    assert (progress.items, progress.nbytes) == (len(got), sum(f.size for f in files))
    for staged in files:
        assert sum(c.source_bytes for c in by_source[staged.source.index]) == staged.size
    assert progress.threads and all(t.startswith("test-reader") for t in progress.threads)


async def test_chunks_queue_is_closed_at_the_end(tmp_path: Path) -> None:
    files = staged_files(tmp_path / "data", count=2)
    cfg = ReadConfig(chunk_rows=100, threads=2)
    files_q = await files_queue(files)
    chunks_q: BoundedQueue[Chunk] = BoundedQueue("chunks", 1000, 1 << 30)  # room for every chunk
    with ThreadPoolExecutor(2) as pool:
        await read_stage(files_q, chunks_q, cfg, pool, meter=StageMeter("read", 2), progress=Progress())
    items = [c async for c in chunks_q]  # ends: the queue was closed
    assert len(items) == sum(len(expected_chunks(f, cfg)) for f in files)
    assert await chunks_q.get() is None
    with pytest.raises(RuntimeError, match="put after close"):
        await chunks_q.put(items[0])


async def test_a_full_chunks_queue_pushes_back_without_losing_chunks(tmp_path: Path) -> None:
    files = staged_files(tmp_path / "data", count=3)
    cfg = ReadConfig(chunk_rows=20, threads=3)
    stats, got, done_calls, meter, _ = await run_stage(files, cfg, chunks_max_items=1)
    assert Counter(c.source_index for c in got) == {f.source.index: len(expected_chunks(f, cfg)) for f in files}
    assert {s.index: n for s, n, _ in done_calls} == {f.source.index: len(expected_chunks(f, cfg)) for f in files}
    assert stats.files == 3
    assert meter.items_out == len(got)


async def test_files_admit_refuses_are_skipped(tmp_path: Path) -> None:
    files = staged_files(tmp_path / "data")
    cfg = ReadConfig(chunk_rows=50, threads=2)
    asked: list[str] = []
    lock = threading.Lock()

    def admit(staged: StagedFile) -> bool:
        with lock:
            asked.append(staged.source.name)
        return staged.source.index % 2 == 0

    stats, got, done_calls, meter, progress = await run_stage(files, cfg, admit=admit)
    assert sorted(asked) == sorted(f.source.name for f in files)  # asked once per file
    assert {c.source_index for c in got} == {0, 2}
    assert sorted(s.index for s, _, _ in done_calls) == [0, 2]  # no done for a skipped file
    kept = [f for f in files if f.source.index % 2 == 0]
    assert (stats.files, stats.bytes) == (2, sum(f.size for f in kept))
    assert (meter.items_in, meter.bytes_in) == (2, sum(f.size for f in kept))
    assert progress.items == len(got) == sum(len(expected_chunks(f, cfg)) for f in kept)


async def test_all_files_refused_still_closes_the_queue(tmp_path: Path) -> None:
    files = staged_files(tmp_path / "data", count=2)
    stats, got, done_calls, meter, progress = await run_stage(
        files, ReadConfig(chunk_rows=50), admit=lambda staged: False
    )
    assert (got, done_calls, stats.files, stats.bytes) == ([], [], 0, 0)
    assert (meter.items_in, meter.items_out, progress.calls) == (0, 0, 0)


async def test_no_files_closes_the_queue(tmp_path: Path) -> None:
    stats, got, done_calls, _, _ = await run_stage([], ReadConfig())
    assert (got, done_calls, stats.files, stats.bytes) == ([], [], 0, 0)


async def test_file_without_rows_is_read_with_zero_chunks(tmp_path: Path) -> None:
    files = staged_files(tmp_path / "data", count=1)
    empty = tmp_path / "data" / "empty.csv"
    empty.write_text("trip_id,note\n")
    files.append(StagedFile(Source(9, str(empty), empty.name, "csv"), empty, empty.stat().st_size))
    stats, got, done_calls, _, _ = await run_stage(files, ReadConfig(chunk_rows=50))
    assert {s.index: n for s, n, _ in done_calls}[9] == 0
    assert {c.source_index for c in got} == {0}
    assert (stats.files, stats.bytes) == (2, sum(f.size for f in files))


async def test_unreadable_file_fails_the_stage(tmp_path: Path) -> None:
    files = staged_files(tmp_path / "data", count=1)
    bad = tmp_path / "data" / "bad.parquet"
    bad.write_bytes(b"this is not parquet" * 100)
    files.append(StagedFile(Source(5, str(bad), bad.name, "parquet"), bad, bad.stat().st_size))
    files_q = await files_queue(files)
    chunks_q: BoundedQueue[Chunk] = BoundedQueue("chunks", 1000, 1 << 30)
    done_calls: list[str] = []
    pool = ThreadPoolExecutor(2)
    try:
        with pytest.raises(ExceptionGroup) as info:
            await read_stage(
                files_q,
                chunks_q,
                ReadConfig(chunk_rows=50),
                pool,
                meter=StageMeter("read", 2),
                progress=Progress(),
                done=lambda s, n: done_calls.append(s.name),
            )
    finally:
        # What the pipeline does on a failure: abort the queue (a reader still putting is
        # woken) and shut the pool down off the loop (its threads put through the loop).
        chunks_q.abort()
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    assert info.group_contains(DataError, match="bad.parquet")
    assert "bad.parquet" not in done_calls

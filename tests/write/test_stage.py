"""etl.write.stage: real writer threads, a real temp folder (or fsspec's memory store)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.queues import BoundedQueue
from etl.core.records import ChunkResult, Part
from etl.core.stats import StageMeter
from etl.write.folder import OutputWriter
from etl.write.objects import ObjectOutputWriter
from etl.write.stage import WriteStats, Written, clean_leftovers, open_writer, write_stage


class Progress:
    def __init__(self) -> None:
        self.items = 0
        self.nbytes = 0
        self._lock = threading.Lock()

    def update(self, items: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.items += items
            self.nbytes += nbytes


def result(source: int, index: int, parts: int = 2, rejects: bool = False) -> ChunkResult:
    """A result as a worker sends it: encoded parts (bytes are opaque to the writer)."""
    made = [
        Part(
            f"month=2026-0{p + 1}/part-{source:05d}-{index:06d}.parquet",
            f"data {source} {index} {p} ".encode() * (50 + p),
            10 + p,
        )
        for p in range(parts)
    ]
    rej = Part(f"rejected-{source:05d}-{index:06d}.jsonl", b'{"reason": "bad"}\n' * 3, 3) if rejects else None
    return ChunkResult(source, index, rows_in=100, rows_out=sum(p.rows for p in made), parts=made, rejects=rej)


async def results_queue(results: list[ChunkResult], max_items: int = 1000) -> BoundedQueue[ChunkResult]:
    q: BoundedQueue[ChunkResult] = BoundedQueue("results", max_items, 1 << 30)

    async def feed() -> None:
        for r in results:
            await q.put(r)
        await q.close()

    asyncio.get_running_loop().create_task(feed())  # fed while the stage drains (bounded queue)
    return q


async def run_stage(
    results: list[ChunkResult], writer: OutputWriter, threads: int = 2, max_items: int = 1000
) -> tuple[WriteStats, list[tuple[ChunkResult, Written]], StageMeter, Progress]:
    q = await results_queue(results, max_items)
    meter = StageMeter("write", threads)
    progress = Progress()
    calls: list[tuple[ChunkResult, Written]] = []
    lock = threading.Lock()

    def written(r: ChunkResult, files: Written) -> None:
        for relpath, _, size in files:  # durable before the call
            if isinstance(writer, ObjectOutputWriter):
                assert writer.fs.exists(f"{writer.root}/{writer.prefix}/{relpath}")
            else:
                assert (writer.tmp / relpath).stat().st_size == size
        with lock:
            calls.append((r, files))

    pool = ThreadPoolExecutor(threads, thread_name_prefix="test-writer")
    try:
        stats = await write_stage(q, writer, threads, pool, meter=meter, progress=progress, written=written)
    finally:
        q.abort()
        await asyncio.to_thread(pool.shutdown, wait=True)
    return stats, calls, meter, progress


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def memory_url() -> Iterator[str]:
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"
    yield f"memory://{bucket}/out"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


# ------------------------------------------------------------------------ write_stage


async def test_every_part_and_reject_file_lands_in_the_temp_folder(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out")
    writer = OutputWriter(out, "run1")
    results = [result(s, i, parts=2, rejects=(i == 1)) for s in range(3) for i in range(3)]
    stats, calls, meter, progress = await run_stage(results, writer, threads=3)

    expected: dict[str, bytes] = {}
    for r in results:
        expected |= {p.relpath: p.data for p in r.parts}
        if r.rejects:
            expected[f"_rejected/{r.rejects.relpath}"] = r.rejects.data
    assert files_under(writer.tmp) == expected
    assert not (tmp_path / "out").exists()  # nothing published by the stage

    # written(result, files): once per result, every file with (relpath, rows, bytes)
    assert sorted((r.source_index, r.index) for r, _ in calls) == sorted((r.source_index, r.index) for r in results)
    for r, files in calls:
        want = [(p.relpath, p.rows, len(p.data)) for p in r.parts]
        if r.rejects:
            want.append((f"_rejected/{r.rejects.relpath}", r.rejects.rows, len(r.rejects.data)))
        assert files == want

    assert stats.parts == sum(len(r.parts) for r in results)  # reject files not counted
    assert meter.items_in == len(results)
    assert meter.bytes_in == sum(r.nbytes for r in results)
    assert meter.items_out == stats.parts
    assert meter.bytes_out == sum(len(p.data) for r in results for p in r.parts)
    assert meter.rows_out == sum(p.rows for r in results for p in r.parts)
    assert progress.items == stats.parts and progress.nbytes == meter.bytes_out

    assert writer.publish() == sorted(expected)
    assert files_under(tmp_path / "out") == expected


async def test_append_mode_reports_the_run_id_named_relpaths(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out", mode="append")
    writer = OutputWriter(out, "run7")
    results = [result(0, 0, rejects=True), result(0, 1)]
    stats, calls, _, _ = await run_stage(results, writer)
    reported = sorted(relpath for _, files in calls for relpath, _, _ in files)
    assert reported == sorted(files_under(writer.tmp))
    assert all("run7" in Path(r).name for r in reported)
    assert stats.parts == 4


async def test_a_full_results_queue_and_one_thread_write_everything(tmp_path: Path) -> None:
    writer = OutputWriter(OutputConfig(path=tmp_path / "out"), "r")
    results = [result(0, i, parts=1) for i in range(12)]
    stats, calls, _, _ = await run_stage(results, writer, threads=1, max_items=1)
    assert stats.parts == 12 and len(calls) == 12
    assert len(files_under(writer.tmp)) == 12


async def test_result_without_parts_still_calls_written(tmp_path: Path) -> None:
    writer = OutputWriter(OutputConfig(path=tmp_path / "out"), "r")
    empty = ChunkResult(0, 0, rows_in=5, rows_out=0)
    stats, calls, meter, _ = await run_stage([empty], writer)
    assert calls == [(empty, [])]
    assert stats.parts == 0 and meter.items_in == 1
    assert files_under(writer.tmp) == {}


async def test_no_results(tmp_path: Path) -> None:
    writer = OutputWriter(OutputConfig(path=tmp_path / "out"), "r")
    stats, calls, _, _ = await run_stage([], writer)
    assert (stats.parts, calls) == (0, [])


async def test_a_part_that_cannot_be_written_fails_the_stage(tmp_path: Path) -> None:
    writer = OutputWriter(OutputConfig(path=tmp_path / "out"), "r")
    bad = ChunkResult(0, 0, 1, 1, parts=[Part("../escape.parquet", b"x", 1)])
    with pytest.raises(ExceptionGroup) as info:
        await run_stage([result(0, 1), bad], writer)
    assert info.group_contains(OutputError)
    assert not (tmp_path / "escape.parquet").exists()


async def test_write_stage_to_an_object_store_prefix(memory_url: str) -> None:
    out = OutputConfig(path=memory_url)
    writer = open_writer(out, "runA")
    results = [result(0, 0, rejects=True), result(1, 0)]
    stats, calls, _, _ = await run_stage(results, writer)
    assert stats.parts == 4
    fs = fsspec.filesystem("memory")
    assert isinstance(writer, ObjectOutputWriter)
    for r, files in calls:
        for (relpath, _, size), data in zip(files, [p.data for p in r.parts] + ([r.rejects.data] if r.rejects else [])):
            assert fs.cat_file(f"{writer.root}/_runs/runA/{relpath}") == data
            assert size == len(data)
    published = writer.publish()
    assert len(published) == 5 and all(p.startswith("_runs/runA/") for p in published)


# ---------------------------------------------------------------- open_writer / clean


def test_open_writer_picks_the_folder_writer_for_a_local_path(tmp_path: Path) -> None:
    writer = open_writer(OutputConfig(path=tmp_path / "out"), "run1")
    assert type(writer) is OutputWriter
    assert writer.tmp == tmp_path / ".out.tmp-run1" and writer.tmp.is_dir()
    writer.discard()


def test_open_writer_from_a_string_path_is_still_a_folder(tmp_path: Path) -> None:
    out = OutputConfig.model_validate({"path": str(tmp_path / "out")})
    assert type(open_writer(out, "run1")) is OutputWriter


def test_open_writer_adopts_a_temp_folder(tmp_path: Path) -> None:
    adopt = tmp_path / ".out.tmp-dead"
    (adopt / "month=1").mkdir(parents=True)
    (adopt / "month=1" / "part-00000-000000.parquet").write_bytes(b"kept")
    writer = open_writer(OutputConfig(path=tmp_path / "out"), "run2", adopt=adopt)
    assert type(writer) is OutputWriter and writer.tmp == adopt
    assert writer.publish() == ["month=1/part-00000-000000.parquet"]
    assert (tmp_path / "out" / "month=1" / "part-00000-000000.parquet").read_bytes() == b"kept"


def test_open_writer_picks_the_object_writer_for_a_url(memory_url: str) -> None:
    writer = open_writer(OutputConfig(path=memory_url), "run1")
    assert type(writer) is ObjectOutputWriter
    assert writer.url == memory_url


def test_clean_leftovers_of_a_local_output(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part.parquet").write_bytes(b"published")
    dead = tmp_path / ".out.tmp-dead1"
    kept = tmp_path / ".out.tmp-dead2"
    old = tmp_path / ".out.old-dead3"
    for d in (dead, kept, old):
        d.mkdir()
        (d / "x").write_bytes(b"x")
    unrelated = tmp_path / ".other.tmp-dead"
    unrelated.mkdir()
    handled = clean_leftovers(out, keep=kept)
    assert sorted(handled) == sorted([dead, old])
    assert not dead.exists() and not old.exists()
    assert kept.is_dir() and unrelated.is_dir()
    assert (tmp_path / "out" / "part.parquet").read_bytes() == b"published"
    assert clean_leftovers(out, keep=kept) == []


def test_clean_leftovers_of_a_missing_parent_is_nothing(tmp_path: Path) -> None:
    assert clean_leftovers(OutputConfig(path=tmp_path / "nowhere" / "out")) == []


def test_clean_leftovers_of_an_object_store_output(memory_url: str) -> None:
    out = OutputConfig(path=memory_url)
    live = open_writer(out, "published")
    live.write(Part("part-00000-000000.parquet", b"p", 1))
    live.publish()
    dead = open_writer(out, "dead")
    dead.write(Part("part-00000-000000.parquet", b"d", 1))  # never published: no manifest
    fs = fsspec.filesystem("memory")
    root = dead.root
    assert fs.exists(f"{root}/_runs/dead/part-00000-000000.parquet")
    assert clean_leftovers(out) == [f"{memory_url}/_runs/dead"]
    assert not fs.exists(f"{root}/_runs/dead")
    assert fs.exists(f"{root}/_runs/published/part-00000-000000.parquet")
    assert clean_leftovers(out) == []


def test_clean_leftovers_of_an_empty_object_store_output(memory_url: str) -> None:
    assert clean_leftovers(OutputConfig(path=memory_url)) == []

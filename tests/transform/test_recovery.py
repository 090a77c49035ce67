"""Crashed-chunk recovery: splitting, merging, split names, and the ChunkRunner's retries,
splits and set-asides, driven by a real in-process executor that crashes on purpose.

``CrashingExecutor`` is a ``ThreadExecutor`` (the serial executor's real code path) that
raises ``WorkerCrashed`` the way ``ProcessExecutor`` reports a dead worker: for pieces of
more than ``max_rows`` rows (what the OOM killer does to a too-large chunk) or for the
first ``fail_first`` attempts. Everything else runs the job's real steps and encoding.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow as pa
import pytest

from etl.core.chunks import decode_ipc, encode_ipc, split_chunk
from etl.core.config import JobConfig, load_job
from etl.core.errors import ChunkTimeout, WorkerCrashed
from etl.core.parts import ipc_to_table, split_name
from etl.core.records import Chunk, ChunkResult, Part
from etl.transform.executors import ThreadExecutor, TransformStats
from etl.transform.recovery import (
    MIN_SPLIT_ROWS,
    OOM_KILL,
    ChunkRunner,
    Watchdog,
    merge_pieces,
    rename_for_split,
)
from etl.transform.worker import WorkerSpec

JOB = """
[job]
name = "rec"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[transform]
executor = "serial"
on_error = "{on_error}"
max_attempts = {attempts}
steps = [{{op = "filter", expr = "fare > 0"}}]

[output]
path = "out"
"""


def job(tmp_path: Path, on_error: str = "fail", attempts: int = 3) -> JobConfig:
    path = tmp_path / f"job-{on_error}-{attempts}.toml"
    path.write_text(JOB.format(on_error=on_error, attempts=attempts))
    return load_job(path)


def table(rows: int, start: int = 0) -> pa.Table:
    ids = list(range(start, start + rows))
    return pa.table({"trip_id": ids, "fare": [float(i % 7) - 1.0 for i in ids]})  # some fares <= 0: filtered


def arrow_chunk(rows: int, index: int = 3, row_start: int = 0) -> Chunk:
    return Chunk(1, "trips-1.parquet", index, row_start, rows, encode_ipc(table(rows, row_start)))


class CrashingExecutor(ThreadExecutor):
    def __init__(
        self,
        cfg: JobConfig,
        max_rows: int | None = None,
        fail_first: int = 0,
        signal: str = OOM_KILL,
        timeout: bool = False,
    ) -> None:
        super().__init__(WorkerSpec(cfg.transform, cfg.output, cfg.read), 1)
        self.max_rows, self.fail_first, self.signal, self.timeout = max_rows, fail_first, signal, timeout
        self.calls: list[tuple[int, int]] = []  # (row_start, rows) of every attempt

    async def run(self, chunk: Chunk) -> ChunkResult:
        self.calls.append((chunk.row_start, chunk.rows))
        too_big = self.max_rows is not None and chunk.rows > self.max_rows
        if too_big or len(self.calls) <= self.fail_first:
            cls = ChunkTimeout if self.timeout else WorkerCrashed
            raise cls(f"worker {self.signal}", item=chunk.label, signal=self.signal)
        return await super().run(chunk)


def run(cfg: JobConfig, executor: CrashingExecutor, chunk: Chunk) -> tuple[ChunkResult, TransformStats]:
    stats = TransformStats()
    try:
        result = asyncio.run(ChunkRunner(executor, cfg.transform, stats, cfg.read).run(chunk))
    finally:
        executor.close()
    return result, stats


def rows_of(result: ChunkResult) -> list[int]:
    """Trip ids in the result's parts, in part-name order (the published order)."""
    ids: list[int] = []
    for part in sorted(result.parts, key=lambda p: p.relpath):
        ids += ipc_to_table(part.data).column("trip_id").to_pylist()  # a worker's piece
    return ids


def dead_letters(result: ChunkResult) -> list[dict]:
    assert result.rejects is not None
    return [json.loads(line) for line in result.rejects.data.decode().splitlines()]


# --------------------------------------------------------------------- split_chunk


@pytest.mark.parametrize("rows", [2, 3, 1001, 4000])
def test_split_arrow_chunk_into_two_halves_that_add_up(rows: int) -> None:
    chunk = arrow_chunk(rows, row_start=500)
    first, second = split_chunk(chunk)  # type: ignore[misc]
    assert (first.rows, second.rows) == (rows // 2, rows - rows // 2)
    assert (first.row_start, second.row_start) == (500, 500 + rows // 2)
    for half in (first, second):
        assert (half.source_index, half.source_name, half.index, half.kind) == (1, "trips-1.parquet", 3, "arrow")
        assert decode_ipc(half.data).num_rows == half.rows
    joined = pa.concat_tables([decode_ipc(first.data), decode_ipc(second.data)])
    assert joined.equals(decode_ipc(chunk.data))


def csv_chunk(records: list[str], row_start: int = 2) -> Chunk:
    data = "".join(records).encode()
    lines = data.count(b"\n")
    return Chunk(0, "a.csv", 0, row_start, lines, data, kind="csv", columns=("trip_id", "note"))


def test_split_csv_chunk_at_a_record_end_keeping_file_lines() -> None:
    records = [f'{i},"note {i}\nsecond line"\n' if i % 3 == 0 else f"{i},plain\n" for i in range(20)]
    chunk = csv_chunk(records)
    first, second = split_chunk(chunk)  # type: ignore[misc]
    assert first.data + second.data == chunk.data
    assert first.data.decode().count('"') % 2 == 0  # never cut inside a quoted value
    assert first.row_start == 2 and second.row_start == 2 + first.rows and first.rows + second.rows == chunk.rows
    assert first.kind == second.kind == "csv" and first.columns == second.columns == chunk.columns


def test_a_csv_chunk_of_one_record_cannot_be_split() -> None:
    assert split_chunk(csv_chunk(['1,"a\nvery\nlong\nnote"\n'])) is None


# ------------------------------------------------------------ names, merge, rename


def test_split_name_inserts_the_half_path_before_the_extension() -> None:
    assert split_name("part-00001-000003.parquet", "0") == "part-00001-000003-h0.parquet"
    assert split_name("m=1/d=x/part-00001-000003.csv", "101") == "m=1/d=x/part-00001-000003-h101.csv"


def leaves(depth: int, path: str = "") -> list[list[str]]:
    """Every way to split a chunk in halves up to ``depth`` times: the leaf paths, in row order."""
    if depth == 0:
        return [[path]]
    out = [[path]]
    for left in leaves(depth - 1, path + "0"):
        for right in leaves(depth - 1, path + "1"):
            out.append(left + right)
    return out


def test_split_names_of_any_split_tree_sort_in_row_order_between_neighbours() -> None:
    trees = [t for t in leaves(3) if t != [""]]
    assert len(trees) > 20
    for tree in trees:
        names = [split_name("m=1/part-00001-000003.parquet", p) for p in tree]
        neighbours = [
            "m=1/part-00001-000002.parquet",
            *names,
            "m=1/part-00001-000004.parquet",
            "m=1/part-00002-000000.parquet",
        ]
        assert sorted(neighbours) == neighbours, tree


def test_rename_for_split_renames_parts_only_for_a_half() -> None:
    parts = [Part("m=1/part-00001-000003.parquet", b"a", 1), Part("m=2/part-00001-000003.parquet", b"b", 1)]
    whole = rename_for_split(ChunkResult(1, 3, 2, 2, parts=list(parts)), "")
    assert [p.relpath for p in whole.parts] == [p.relpath for p in parts]
    half = rename_for_split(ChunkResult(1, 3, 2, 2, parts=list(parts)), "10")
    assert [p.relpath for p in half.parts] == ["m=1/part-00001-000003-h10.parquet", "m=2/part-00001-000003-h10.parquet"]
    assert [p.data for p in half.parts] == [b"a", b"b"]


def test_merge_pieces_keeps_parts_in_order_sums_counts_and_joins_dead_letters() -> None:
    chunk = arrow_chunk(10)
    a = ChunkResult(
        1,
        3,
        rows_in=5,
        rows_out=4,
        rows_rejected=1,
        parts=[Part("part-00001-000003-h0.parquet", b"a", 4)],
        rejects=Part("rejected-00001-000003.jsonl", b'{"row": 2}\n', 1),
        seconds=1.0,
        attempts=1,
        decode_seconds=0.1,
        steps_seconds=0.2,
        encode_seconds=0.3,
    )
    b = ChunkResult(
        1, 3, rows_in=3, rows_out=3, parts=[Part("part-00001-000003-h10.parquet", b"b", 3)], seconds=2.0, attempts=3
    )
    c = ChunkResult(
        1,
        3,
        rows_in=2,
        rows_out=0,
        rows_rejected=2,
        attempts=2,
        rejects=Part("rejected-00001-000003.jsonl", b'{"row": 8}\n{"row": 9}\n', 2),
    )
    m = merge_pieces(chunk, [a, b, c])
    assert (m.source_index, m.index) == (1, 3)
    assert [p.relpath for p in m.parts] == ["part-00001-000003-h0.parquet", "part-00001-000003-h10.parquet"]
    assert (m.rows_in, m.rows_out, m.rows_rejected) == (10, 7, 3)
    assert m.seconds == pytest.approx(3.0) and m.attempts == 3
    assert (m.decode_seconds, m.steps_seconds, m.encode_seconds) == pytest.approx((0.1, 0.2, 0.3))
    assert m.rejects is not None and m.rejects.relpath == "rejected-00001-000003.jsonl" and m.rejects.rows == 3
    assert m.rejects.data == b'{"row": 2}\n{"row": 8}\n{"row": 9}\n'


def test_merge_pieces_without_dead_letters_has_none() -> None:
    m = merge_pieces(arrow_chunk(4), [ChunkResult(1, 3, 2, 2), ChunkResult(1, 3, 2, 1)])
    assert m.rejects is None and (m.rows_in, m.rows_out) == (4, 3)


# ----------------------------------------------------------------------- ChunkRunner


def test_a_chunk_that_runs_is_returned_as_it_is(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    executor = CrashingExecutor(cfg)
    result, stats = run(cfg, executor, arrow_chunk(100))
    assert result.attempts == 1 and executor.calls == [(0, 100)]
    assert [p.relpath for p in result.parts] == ["part-00001-000003.arrow"]
    assert rows_of(result) == [i for i in range(100) if i % 7 > 1]
    assert (stats.retries, stats.splits, stats.pieces_set_aside) == (0, 0, 0)


def test_oom_killed_chunk_is_split_recursively_and_gives_the_same_rows(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    rows = 4 * MIN_SPLIT_ROWS
    executor = CrashingExecutor(cfg, max_rows=MIN_SPLIT_ROWS + MIN_SPLIT_ROWS // 2)  # halves of 2000 still die
    result, stats = run(cfg, executor, arrow_chunk(rows))
    assert sorted(p.relpath for p in result.parts) == [
        f"part-00001-000003-h{h}.arrow" for h in ("00", "01", "10", "11")
    ]
    assert rows_of(result) == [i for i in range(rows) if i % 7 > 1]  # serial order from the names
    assert (result.source_index, result.index, result.rows_in) == (1, 3, rows)
    assert result.rows_out == len(rows_of(result)) and result.rows_rejected == 0
    assert stats.splits == 3 and stats.retries == 0 and result.attempts == 1  # splitting costs no attempt
    assert executor.calls[0] == (0, rows) and executor.calls[-1] == (3 * MIN_SPLIT_ROWS, MIN_SPLIT_ROWS)


def test_other_crashes_are_retried_whole_up_to_max_attempts(tmp_path: Path) -> None:
    cfg = job(tmp_path, attempts=3)
    executor = CrashingExecutor(cfg, fail_first=2, signal="killed by SIGTERM")
    result, stats = run(cfg, executor, arrow_chunk(4 * MIN_SPLIT_ROWS))
    assert result.attempts == 3 and stats.retries == 2 and stats.splits == 0
    assert executor.calls == [(0, 4 * MIN_SPLIT_ROWS)] * 3
    assert [p.relpath for p in result.parts] == ["part-00001-000003.arrow"]


def test_a_timeout_is_retried_whole_even_with_the_oom_signal(tmp_path: Path) -> None:
    cfg = job(tmp_path, attempts=2)
    executor = CrashingExecutor(cfg, fail_first=1, timeout=True)
    result, stats = run(cfg, executor, arrow_chunk(4 * MIN_SPLIT_ROWS))
    assert stats.splits == 0 and stats.retries == 1 and result.attempts == 2


def test_a_small_oom_killed_chunk_is_retried_not_split(tmp_path: Path) -> None:
    cfg = job(tmp_path, attempts=3)
    executor = CrashingExecutor(cfg, fail_first=1)
    result, stats = run(cfg, executor, arrow_chunk(2 * MIN_SPLIT_ROWS - 1))
    assert stats.splits == 0 and stats.retries == 1 and result.attempts == 2


def test_on_error_fail_raises_naming_the_piece_and_the_attempts(tmp_path: Path) -> None:
    cfg = job(tmp_path, "fail", attempts=2)
    executor = CrashingExecutor(cfg, fail_first=99, signal="killed by SIGSEGV")
    chunk = arrow_chunk(50)
    with pytest.raises(WorkerCrashed) as info:
        run(cfg, executor, chunk)
    e = info.value
    assert e.item == chunk.label and e.signal == "killed by SIGSEGV" and e.attempts == 2
    assert "attempt 2 of transform.max_attempts = 2" in str(e)
    assert len(executor.calls) == 2


def test_on_error_quarantine_sets_every_row_aside_with_the_reason(tmp_path: Path) -> None:
    cfg = job(tmp_path, "quarantine", attempts=2)
    executor = CrashingExecutor(cfg, fail_first=99, signal="killed by SIGSEGV")
    result, stats = run(cfg, executor, arrow_chunk(30, row_start=100))
    assert (result.rows_in, result.rows_out, result.rows_rejected, result.parts) == (30, 0, 30, [])
    assert stats.pieces_set_aside == 1 and result.attempts == 2
    assert result.rejects is not None and result.rejects.relpath == "rejected-00001-000003.jsonl"
    letters = dead_letters(result)
    assert [d["row"] for d in letters] == list(range(100, 130))
    assert letters[0]["source"] == "trips-1.parquet" and letters[0]["step"] == "transform"
    assert letters[0]["reason"] == "worker crashed: killed by SIGSEGV after 2 attempts"
    assert letters[0]["raw"] == {"trip_id": 100, "fare": 100 % 7 - 1.0}


def test_on_error_skip_counts_the_rows_without_dead_letters(tmp_path: Path) -> None:
    cfg = job(tmp_path, "skip", attempts=1)
    result, stats = run(cfg, CrashingExecutor(cfg, fail_first=99, signal="exit code 1"), arrow_chunk(30))
    assert (result.rows_in, result.rows_rejected, result.rejects) == (30, 30, None)
    assert stats.pieces_set_aside == 1 and stats.retries == 0


def test_timed_out_chunk_set_aside_says_so(tmp_path: Path) -> None:
    cfg = job(tmp_path, "quarantine", attempts=1)
    result, _ = run(cfg, CrashingExecutor(cfg, fail_first=99, timeout=True), arrow_chunk(5))
    assert dead_letters(result)[0]["reason"].startswith("chunk timed out: ran longer than transform.chunk_timeout")


def test_halves_that_keep_dying_are_set_aside_into_one_dead_letter_file(tmp_path: Path) -> None:
    cfg = job(tmp_path, "quarantine", attempts=2)
    rows = 2 * MIN_SPLIT_ROWS
    executor = CrashingExecutor(cfg, max_rows=MIN_SPLIT_ROWS // 2)  # every half of 1000 dies too
    result, stats = run(cfg, executor, arrow_chunk(rows, row_start=7))
    assert stats.splits == 1 and stats.pieces_set_aside == 2 and stats.retries == 2
    assert (result.rows_in, result.rows_out, result.rows_rejected, result.parts) == (rows, 0, rows, [])
    assert result.rejects is not None and result.rejects.relpath == "rejected-00001-000003.jsonl"
    assert result.rejects.rows == rows
    assert [d["row"] for d in dead_letters(result)] == list(range(7, 7 + rows))  # one file, in row order


def test_a_split_where_only_one_half_dies_keeps_the_other_halfs_rows(tmp_path: Path) -> None:
    cfg = job(tmp_path, "quarantine", attempts=1)

    class SecondHalfDies(CrashingExecutor):
        async def run(self, chunk: Chunk) -> ChunkResult:
            if chunk.rows > MIN_SPLIT_ROWS or chunk.row_start >= MIN_SPLIT_ROWS:
                self.calls.append((chunk.row_start, chunk.rows))
                raise WorkerCrashed("worker killed", item=chunk.label, signal=OOM_KILL)
            return await ThreadExecutor.run(self, chunk)

    result, stats = run(cfg, SecondHalfDies(cfg), arrow_chunk(2 * MIN_SPLIT_ROWS))
    assert [p.relpath for p in result.parts] == ["part-00001-000003-h0.arrow"]
    assert rows_of(result) == [i for i in range(MIN_SPLIT_ROWS) if i % 7 > 1]
    assert (result.rows_in, result.rows_rejected) == (
        2 * MIN_SPLIT_ROWS,
        MIN_SPLIT_ROWS,
    )  # filtered rows are not rejected
    assert [d["row"] for d in dead_letters(result)] == list(range(MIN_SPLIT_ROWS, 2 * MIN_SPLIT_ROWS))
    assert stats.splits == 1 and stats.pieces_set_aside == 1


# ------------------------------------------------------------ stall watchdog (issue 21)

HANG_GUARD = 30.0  # seconds: only a run the watchdog failed to rescue gets near it


class LosingExecutor(ThreadExecutor):
    """Loses the first ``lose`` attempts: they are never answered and no worker is on them
    (``busy() == 0``), as when a chunk vanished in a broken pool. ``hold`` makes every
    attempt wait that long first with a worker on it (``busy() == 1``): slow, not lost."""

    def __init__(self, cfg: JobConfig, lose: int, hold: float = 0.0) -> None:
        super().__init__(WorkerSpec(cfg.transform, cfg.output, cfg.read), 1)
        self.lose, self.hold, self.attempts, self.held = lose, hold, 0, 0

    async def run(self, chunk: Chunk) -> ChunkResult:
        self.attempts += 1
        if self.attempts <= self.lose:
            await asyncio.Event().wait()  # never answered
        if not self.hold:
            return await super().run(chunk)
        self.held += 1  # a worker is on it from here to the result
        try:
            await asyncio.sleep(self.hold)
            return await super().run(chunk)
        finally:
            self.held -= 1

    def busy(self) -> int:
        return self.held + super().busy()


def watched(cfg: JobConfig, executor: LosingExecutor, chunks: list[Chunk], stall: float) -> tuple[list, Watchdog]:
    stats = TransformStats()
    dog = Watchdog(stall, executor.busy)

    async def go() -> list:
        guard = asyncio.create_task(dog.run())
        try:
            runner = ChunkRunner(executor, cfg.transform, stats, cfg.read, dog)
            return list(await asyncio.wait_for(asyncio.gather(*(runner.run(c) for c in chunks)), HANG_GUARD))
        finally:
            guard.cancel()
            executor.close()

    return asyncio.run(go()), dog


def test_watchdog_resubmits_a_lost_chunk_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    chunks = [arrow_chunk(50, index=i, row_start=50 * i) for i in range(3)]
    expected, _ = run(cfg, CrashingExecutor(cfg), chunks[0])
    (first, *rest), dog = watched(cfg, LosingExecutor(cfg, lose=1), chunks, stall=0.3)
    assert dog.stalls == 1 and dog.longest_quiet >= 0.3  # the stall's length is measured
    assert rows_of(first) == rows_of(expected) and first.attempts == 2
    assert [r.index for r in rest] == [1, 2]


def test_watchdog_fails_the_run_naming_the_chunk_when_it_stays_lost(tmp_path: Path) -> None:
    cfg = job(tmp_path, attempts=2)
    chunk = arrow_chunk(50)
    with pytest.raises(WorkerCrashed, match="stall_timeout") as info:
        watched(cfg, LosingExecutor(cfg, lose=99), [chunk], stall=0.2)
    assert info.value.item == chunk.label and info.value.signal == "stalled"
    assert "attempt 2 of transform.max_attempts = 2" in info.value.message


def test_watchdog_leaves_a_slow_chunk_alone_while_a_worker_is_on_it(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    executor = LosingExecutor(cfg, lose=0, hold=0.8)  # four stall periods, busy throughout
    (result,), dog = watched(cfg, executor, [arrow_chunk(50)], stall=0.2)
    assert dog.stalls == 0 and executor.attempts == 1 and result.attempts == 1
    assert dog.longest_quiet >= 0.8  # quiet, but a worker was on it all along

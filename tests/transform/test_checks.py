"""Row checks on a chunk's output (etl.transform.checks): counts, examples, unique keys, schema."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from etl.core.config import ChecksConfig
from etl.core.errors import StepError
from etl.core.records import ChunkChecks
from etl.transform.checks import check_chunk, unique_keys


def frame() -> pd.DataFrame:
    """A transformed chunk: indexed by the file line each row started on."""
    df = pd.DataFrame(
        {
            "id": pd.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=pd.ArrowDtype(pa.int64())),
            "fare": pd.array([5.0, -1.0, None, 12.5, -3.0, 0.0, 99.0, 7.0], dtype=pd.ArrowDtype(pa.float64())),
            "payment": pd.array(["card", "cash", None, "voucher", "card", "Card", "cash", "card"], dtype="string"),
            "at": pd.to_datetime([f"2026-01-0{d}" for d in range(1, 9)]),
        }
    )
    df.index = pd.RangeIndex(10, 18)  # lines 10-17 of the file
    return df


def run(cfg: dict[str, Any], df: pd.DataFrame | None = None) -> ChunkChecks:
    checks = ChecksConfig.model_validate(cfg)
    return check_chunk(frame() if df is None else df, checks, "trips-1.csv", "line", "trips-1.csv[chunk 0]")


@pytest.mark.parametrize(
    ("cfg", "name", "failing_lines"),
    [
        ({"columns": {"fare": {"not_null": True}}}, "not_null(fare)", [12]),
        ({"columns": {"id": {"not_null": True}}}, "not_null(id)", []),
        ({"columns": {"fare": {"min": 0}}}, "min(fare)", [11, 14]),  # the null passes
        ({"columns": {"fare": {"min": -5}}}, "min(fare)", []),
        ({"columns": {"fare": {"max": 50}}}, "max(fare)", [16]),
        ({"columns": {"fare": {"max": 99}}}, "max(fare)", []),
        ({"columns": {"payment": {"accepted_values": ["card", "cash"]}}}, "accepted_values(payment)", [13, 15]),
        (
            {"columns": {"payment": {"accepted_values": ["card", "cash", "voucher", "Card"]}}},
            "accepted_values(payment)",
            [],
        ),
        ({"columns": {"at": {"min": "2026-01-03"}}}, "min(at)", [10, 11]),  # a string is parsed for timestamps
        ({"expect": [{"expr": "fare >= 0 or payment == 'cash'"}]}, "expect[0]", [12, 14]),  # null fails an expect
        ({"expect": [{"expr": "id > 0", "name": "positive_id"}]}, "positive_id", []),
    ],
)
def test_each_row_check_passes_or_counts_its_failing_rows(
    cfg: dict[str, Any], name: str, failing_lines: list[int]
) -> None:
    tally = run(cfg).tallies[name]
    assert tally.failed == len(failing_lines)
    assert [e["line"] for e in tally.examples] == failing_lines
    assert all(e["file"] == "trips-1.csv" for e in tally.examples)


def test_examples_show_the_checked_values_and_stop_at_five() -> None:
    df = pd.DataFrame({"x": pd.array(range(20), dtype="Int64"), "y": ["a"] * 20})
    df.index = pd.RangeIndex(100, 120)
    tally = run({"expect": [{"expr": "x < 3 and y == 'b'"}]}, df).tallies["expect[0]"]
    assert tally.failed == 20
    assert tally.examples == [{"file": "trips-1.csv", "line": 100 + i, "values": {"x": i, "y": "a"}} for i in range(5)]


def test_a_check_on_a_missing_column_is_a_step_error_naming_the_key() -> None:
    with pytest.raises(StepError) as info:
        run({"columns": {"tip": {"min": 0}}})
    assert info.value.step == "checks.columns.tip.min" and "unknown column 'tip'" in str(info.value)
    with pytest.raises(StepError, match="checks.columns.tip.unique"):
        run({"columns": {"tip": {"unique": True}}})


def keys(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(blob) // 24
    return np.frombuffer(blob, "<u8", count=2 * n).reshape(n, 2), np.frombuffer(blob, "<i8", offset=16 * n)


def test_unique_keys_hash_non_null_values_with_their_lines() -> None:
    found = run({"columns": {"payment": {"unique": True}}})
    hashes, lines = keys(found.keys["payment"])
    assert lines.tolist() == [10, 11, 13, 14, 15, 16, 17]  # line 12's null is left out
    pairs = {tuple(h) for h in hashes}
    assert len(pairs) == 4  # card x3, cash x2, voucher, Card
    assert not found.tallies  # unique is decided over the whole run, not per chunk


def test_equal_values_hash_equal_in_every_chunk_and_dtype() -> None:
    """Chunks of one run may hold a column as numpy, nullable or Arrow: a value's key must not change."""
    a = unique_keys(pd.Series([7, 8], dtype="int64"))
    b = unique_keys(pd.Series([7, 8], dtype=pd.ArrowDtype(pa.int64())))
    c = unique_keys(pd.Series([7, None, 8], dtype="Int64"))
    assert keys(a)[0].tolist() == keys(b)[0].tolist() == keys(c)[0].tolist()
    s1 = unique_keys(pd.Series(["x", "y"], dtype=object))
    s2 = unique_keys(pd.Series(["x", "y"], dtype="string[pyarrow]"))
    assert keys(s1)[0].tolist() == keys(s2)[0].tolist()


def test_schema_is_reported_in_one_spelling() -> None:
    found = run({"schema": {"columns": {"id": "int64"}}})
    assert found.schema == (("id", "int64"), ("fare", "double"), ("payment", "string"), ("at", "timestamp[us]"))
    assert run({"schema": {"columns": {"id": "int64"}}}, frame().head(0)).schema is None  # nothing published


def test_results_merge_across_pieces_and_pickle() -> None:
    cfg = {"columns": {"fare": {"min": 0, "unique": True}}}
    first, second = run(cfg, frame().iloc[:4]), run(cfg, frame().iloc[4:])
    first.merge(second)
    whole = run(cfg)
    assert first.tallies["min(fare)"] == whole.tallies["min(fare)"]
    assert sorted(keys(first.keys["fare"])[1]) == sorted(keys(whole.keys["fare"])[1])
    again = pickle.loads(pickle.dumps(first))
    assert again.tallies == first.tallies and again.keys == first.keys


def test_a_chunk_split_after_a_crash_keeps_every_pieces_checks() -> None:
    """etl.transform.recovery halves a chunk whose worker was killed: the pieces' checks add up."""
    from etl.core.chunks import encode_ipc
    from etl.core.records import Chunk, ChunkResult
    from etl.transform.recovery import merge_pieces

    cfg = {"columns": {"fare": {"min": 0, "unique": True}}}
    chunk = Chunk(0, "trips-1.csv", 0, 10, 8, encode_ipc(pa.table({"x": [1]})))
    first, second = (ChunkResult(0, 0, 4, 4, checks=run(cfg, part)) for part in (frame().iloc[:4], frame().iloc[4:]))
    merged = merge_pieces(chunk, [first, second])
    assert merged.checks is not None
    assert merged.checks.tallies["min(fare)"] == run(cfg).tallies["min(fare)"]
    assert len(keys(merged.checks.keys["fare"])[1]) == 7

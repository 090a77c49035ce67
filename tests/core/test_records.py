"""The plain records that cross threads and processes: they pickle, name themselves, know their size."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from etl.core.records import (
    RESULT_COUNTERS,
    Chunk,
    ChunkResult,
    Part,
    Source,
    StagedFile,
)


def test_source_pickles_and_knows_if_it_is_remote() -> None:
    src = Source(3, "https://h/a.csv.gz", "a.csv.gz", "csv", sha256="0" * 64, headers=(("Accept", "text/csv"),))
    assert pickle.loads(pickle.dumps(src)) == src
    assert src.is_remote and Source(0, "http://h/b", "b", "csv").is_remote
    assert not Source(0, "/data/a.csv", "a.csv", "csv").is_remote
    assert not Source(0, "s3://bucket/a.csv", "a.csv", "csv").is_remote


def test_records_are_immutable() -> None:
    src = Source(0, "/a.csv", "a.csv", "csv")
    with pytest.raises(AttributeError):
        src.name = "b"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Chunk(0, "a", 0, 0, 1, b"x").rows = 2  # type: ignore[misc]


def test_staged_file_round_trips_and_carries_no_bytes(tmp_path: Path) -> None:
    staged = StagedFile(Source(0, str(tmp_path / "a.csv"), "a.csv", "csv"), tmp_path / "a.csv", 1234, unchanged=True)
    assert pickle.loads(pickle.dumps(staged)) == staged
    assert staged.nbytes == 0  # only the path travels through the files queue


@pytest.mark.parametrize("kind", ["arrow", "csv"])
def test_chunk_pickle_round_trip_keeps_data_and_identity(kind: str) -> None:
    data = bytes(range(256)) * 100
    c = Chunk(2, "trips-2.csv", 7, row_start=701, rows=100, data=data, kind=kind, columns=("a", "b"))  # type: ignore[arg-type]
    back = pickle.loads(pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == c and back.data == data and back.columns == ("a", "b") and back.kind == kind


def test_csv_chunk_label_names_source_chunk_and_file_lines() -> None:
    c = Chunk(0, "trips-1.csv", 0, row_start=2, rows=50, data=b"", kind="csv")
    assert c.unit == "line"
    assert c.label == "trips-1.csv[chunk 0, lines 2-51]"


def test_arrow_chunk_label_names_data_rows_zero_based() -> None:
    c = Chunk(1, "t.parquet", 3, row_start=300, rows=100, data=b"")
    assert c.unit == "row"
    assert c.label == "t.parquet[chunk 3, rows 300-399]"


def test_chunk_label_of_a_single_row() -> None:
    assert Chunk(0, "a.jsonl", 5, row_start=9, rows=1, data=b"").label == "a.jsonl[chunk 5, rows 9-9]"


def test_chunk_nbytes_is_its_data_length() -> None:
    assert Chunk(0, "a", 0, 0, 3, b"abc\n" * 10).nbytes == 40
    assert Chunk(0, "a", 0, 0, 0, b"").nbytes == 0


def test_chunk_repr_leaves_the_data_out() -> None:
    assert "data" not in repr(Chunk(0, "a", 0, 0, 1, b"secret-bytes"))
    assert "secret-bytes" not in repr(Part("p.parquet", b"secret-bytes", 1))


def test_result_nbytes_counts_parts_and_rejects() -> None:
    r = ChunkResult(
        0,
        0,
        rows_in=5,
        rows_out=3,
        rows_rejected=2,
        parts=[Part("part-00000-000000.parquet", b"x" * 100, 2), Part("m=2/p.parquet", b"y" * 50, 1)],
        rejects=Part("rejected-00000-000000.jsonl", b"z" * 7, 2),
    )
    assert r.nbytes == 157
    assert ChunkResult(0, 0, rows_in=0, rows_out=0).nbytes == 0


def test_result_pickle_round_trip() -> None:
    r = ChunkResult(
        4,
        9,
        rows_in=10,
        rows_out=8,
        rows_rejected=2,
        parts=[Part("a.parquet", b"\x00\x01", 8)],
        rejects=Part("rejected-00004-000009.jsonl", b"{}\n", 2),
        seconds=1.5,
        attempts=2,
        decode_seconds=0.5,
        steps_seconds=0.5,
        encode_seconds=0.5,
    )
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.parts[0].data == b"\x00\x01" and back.rejects is not None


def test_result_defaults_and_counters_are_fields() -> None:
    r = ChunkResult(0, 0, rows_in=1, rows_out=1)
    assert r.parts == [] and r.rejects is None and r.attempts == 1
    assert ChunkResult(0, 1, rows_in=1, rows_out=1).parts is not r.parts  # no shared default list
    for name in RESULT_COUNTERS:
        assert isinstance(getattr(r, name), (int, float))

"""etl.read.sample: the planner's samples, from real local files and real compressed heads."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import zlib
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from etl.core.chunks import decode_chunk
from etl.core.config import ReadConfig
from etl.core.records import Chunk, Source, StagedFile
from etl.read.formats import read_chunks
from etl.read.sample import can_sample_head, sample_chunk, sample_from_head
from tests.conftest import write_trips_csv


def local(path: Path, fmt: str = "csv", index: int = 0) -> Source:
    return Source(index, str(path), path.name, fmt)  # type: ignore[arg-type]


def remote(name: str, fmt: str = "csv", index: int = 3) -> Source:
    return Source(index, f"https://example.test/data/{name}", name, fmt)  # type: ignore[arg-type]


def records(text: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text.decode(), newline="")))


def chunk_trip_ids(chunk: Chunk, cfg: ReadConfig) -> list[str]:
    df, _ = decode_chunk(chunk, cfg, "fail")
    return [str(v) for v in df["trip_id"]]


@pytest.fixture
def trips(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "trips.csv"  # not where the samples are written (tmp_path)
    write_trips_csv(path, rows=600, seed=11)
    return path


def all_trip_ids(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [row["trip_id"] for row in csv.DictReader(f)]


# --------------------------------------------------------------------- sample_chunk


def test_sample_chunk_arrow_is_the_first_rows_exactly(trips: Path) -> None:
    cfg = ReadConfig(parse="reader", chunk_rows=1000)
    chunk, grown = sample_chunk(local(trips), cfg, rows=100, read_rows=300)
    assert chunk is not None
    assert (chunk.kind, chunk.index, chunk.row_start, chunk.rows) == ("arrow", 0, 0, 100)
    assert chunk_trip_ids(chunk, cfg) == all_trip_ids(trips)[:100]
    assert grown >= 0


def test_sample_chunk_keeps_a_smaller_chunk_rows(trips: Path) -> None:
    cfg = ReadConfig(parse="reader", chunk_rows=40)
    chunk, grown = sample_chunk(local(trips), cfg, rows=100, read_rows=300)
    assert chunk is not None and chunk.rows == 40  # min(chunk_rows, rows)
    assert chunk_trip_ids(chunk, cfg) == all_trip_ids(trips)[:40]
    assert grown >= 0


def test_sample_chunk_csv_is_the_first_records_of_the_file(trips: Path) -> None:
    cfg = ReadConfig(chunk_rows=1000)  # parse = "worker": raw text chunks
    chunk, grown = sample_chunk(local(trips), cfg, rows=100, read_rows=300)
    assert chunk is not None
    assert (chunk.kind, chunk.index, chunk.row_start) == ("csv", 0, 2)  # line 2: after the header
    ids = chunk_trip_ids(chunk, cfg)
    assert 0 < len(ids) < 600
    assert ids == all_trip_ids(trips)[: len(ids)]
    # the same first chunk the read stage would hand on with chunk_rows = 100
    first = next(iter(read_chunks(StagedFile(local(trips), trips, trips.stat().st_size), ReadConfig(chunk_rows=100))))
    assert chunk.data == first.data
    assert grown >= 0


def test_sample_chunk_of_a_file_smaller_than_rows_is_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "small.csv"
    write_trips_csv(path, rows=25, seed=3)
    cfg = ReadConfig(parse="reader")
    chunk, grown = sample_chunk(local(path), cfg, rows=100, read_rows=1000)
    assert chunk is not None and chunk.rows == 25
    assert chunk_trip_ids(chunk, cfg) == all_trip_ids(path)
    assert grown >= 0


def test_sample_chunk_of_a_gzip_file(tmp_path: Path, trips: Path) -> None:
    gz = tmp_path / "trips.csv.gz"
    gz.write_bytes(gzip.compress(trips.read_bytes()))
    cfg = ReadConfig(parse="reader")
    chunk, grown = sample_chunk(local(gz), cfg, rows=50, read_rows=50)
    assert chunk is not None and chunk.rows == 50
    assert chunk_trip_ids(chunk, cfg) == all_trip_ids(trips)[:50]
    assert grown >= 0


@pytest.mark.parametrize("parse", ["reader", "worker"])
def test_sample_chunk_of_a_header_only_file_is_none(tmp_path: Path, parse: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("a,b,c\n")
    chunk, grown = sample_chunk(local(path), ReadConfig(parse=parse), rows=10, read_rows=10)  # type: ignore[arg-type]
    assert chunk is None
    assert grown >= 0


def test_sample_chunk_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        sample_chunk(local(tmp_path / "gone.csv"), ReadConfig(), rows=10, read_rows=10)


# ------------------------------------------------------------------ can_sample_head


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (remote("t.csv"), True),
        (remote("t.csv.gz"), True),
        (remote("t.csv.GZ"), True),
        (remote("t.csv.gzip"), True),
        (remote("t.csv.bz2"), True),
        (remote("t.jsonl"), True),
        (remote("t.jsonl.gz"), True),
        (remote("t.csv.zst"), False),
        (remote("t.csv.zstd"), False),
        (remote("t.parquet", "parquet"), False),
        (Source(0, "http://plain.test/t.csv", "t.csv", "csv"), True),
        (Source(0, "/data/t.csv", "t.csv", "csv"), False),
        (Source(0, "/data/t.csv.gz", "t.csv.gz", "csv"), False),
        (Source(0, "s3://bucket/t.csv", "t.csv", "csv"), False),
    ],
)
def test_can_sample_head(source: Source, expected: bool) -> None:
    assert can_sample_head(source) is expected


# ----------------------------------------------------------------- sample_from_head


def cut_inside_quoted_newline(text: bytes) -> int:
    """An offset just after a newline that sits inside a quoted field ("two\\nlines")."""
    at = text.index(b'"two\nlines"', len(text) // 3)
    return at + len(b'"two\n')


def test_sample_from_head_of_plain_csv_cut_inside_a_quoted_newline(tmp_path: Path, trips: Path) -> None:
    text = trips.read_bytes()
    cut = cut_inside_quoted_newline(text)
    src = remote("trips.csv")
    sample = sample_from_head(text[:cut], src, tmp_path)
    path = Path(sample.url)
    assert path == tmp_path / "trips.csv"
    kept = path.read_bytes()
    assert text.startswith(kept) and kept.endswith(b"\n")
    assert len(kept) < cut - len(b'"two\n')  # the record holding the cut is dropped whole
    rows = records(kept)
    assert rows[0][0] == "trip_id"
    assert all(len(r) == 10 for r in rows)
    assert [r[0] for r in rows[1:]] == all_trip_ids(trips)[: len(rows) - 1]
    # nothing whole was lost: the next record starts right where the sample ends
    rest = records(text[len(kept) :])
    assert rest[0][0] == all_trip_ids(trips)[len(rows) - 1]
    assert (sample.index, sample.format) == (src.index, "csv")
    assert sample.name.startswith("trips.csv") and not sample.is_remote
    assert pacsv.read_csv(path).num_rows == len(rows) - 1  # the written file parses


def test_sample_from_head_of_plain_csv_cut_mid_line(tmp_path: Path, trips: Path) -> None:
    text = trips.read_bytes()
    line_end = text.index(b"\n", len(text) // 2)
    while text[: line_end + 1].count(b'"') % 2:  # a real record end, not one inside quotes
        line_end = text.index(b"\n", line_end + 1)
    sample = sample_from_head(text[: line_end + 5], remote("trips.csv"), tmp_path)
    assert Path(sample.url).read_bytes() == text[: line_end + 1]


def test_sample_from_head_of_a_gzip_head(tmp_path: Path, trips: Path) -> None:
    text = trips.read_bytes()
    raw = gzip.compress(text)
    head = raw[: len(raw) // 2]  # a truncated gzip stream, cut anywhere
    sample = sample_from_head(head, remote("trips.csv.gz", index=7), tmp_path)
    path = Path(sample.url)
    assert path == tmp_path / "trips.csv"  # the codec's suffix dropped: the sample is plain text
    kept = path.read_bytes()
    assert kept and text.startswith(kept) and kept.endswith(b"\n")
    assert f"(first {len(head) >> 10} KiB)" in sample.name
    assert sample.index == 7
    rows = records(kept)
    assert all(len(r) == 10 for r in rows)
    assert pacsv.read_csv(path).num_rows == len(rows) - 1
    # it reads as a local source, like the planner uses it
    chunk, _ = sample_chunk(sample, ReadConfig(parse="reader"), rows=10_000, read_rows=10_000)
    assert chunk is not None and chunk.rows == len(rows) - 1


def test_sample_from_head_of_a_gzip_head_cut_inside_a_quoted_newline(tmp_path: Path, trips: Path) -> None:
    text = trips.read_bytes()
    cut = cut_inside_quoted_newline(text)
    # a gzip stream flushed exactly at the cut: its head decompresses to text[:cut]
    compressor = zlib.compressobj(wbits=31)
    head = compressor.compress(text[:cut]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    whole = head + compressor.compress(text[cut:]) + compressor.flush()
    assert gzip.decompress(whole) == text
    sample = sample_from_head(head, remote("trips.csv.gz"), tmp_path)
    kept = Path(sample.url).read_bytes()
    assert text.startswith(kept)
    assert text[len(kept) : cut].count(b"\n") == 1  # dropped: the one record the cut landed in
    assert all(len(r) == 10 for r in records(kept))
    assert pacsv.read_csv(Path(sample.url)).num_rows == len(records(kept)) - 1


def test_sample_from_head_of_a_bz2_head(tmp_path: Path, trips: Path) -> None:
    text = trips.read_bytes() * 8  # more than one 100k bz2 block, so a head decompresses to something
    raw = bz2.compress(text, compresslevel=1)
    sample = sample_from_head(raw[: len(raw) * 3 // 4], remote("trips.csv.bz2"), tmp_path)
    kept = Path(sample.url).read_bytes()
    assert kept and text.startswith(kept)
    assert Path(sample.url).name == "trips.csv"
    assert all(len(r) == 10 for r in records(kept))


def test_sample_from_head_of_jsonl_keeps_whole_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "note": "x" * (i % 7)}) for i in range(2000)]
    text = ("\n".join(lines) + "\n").encode()
    raw = gzip.compress(text)
    sample = sample_from_head(raw[: len(raw) // 2], remote("events.jsonl.gz", "jsonl"), tmp_path)
    kept = Path(sample.url).read_bytes()
    assert sample.format == "jsonl" and Path(sample.url).name == "events.jsonl"
    assert kept.endswith(b"\n") and text.startswith(kept)
    assert [json.loads(x)["id"] for x in kept.splitlines()] == list(range(len(kept.splitlines())))


def test_sample_from_head_of_bytes_that_are_not_gzip_raises(tmp_path: Path) -> None:
    with pytest.raises((OSError, ValueError, zlib.error)):
        sample_from_head(b"this is not gzip at all\n" * 10, remote("t.csv.gz"), tmp_path)


def test_sample_from_head_of_a_gzip_bomb_is_bounded(tmp_path: Path) -> None:
    import zlib

    from etl.read.sample import MAX_SAMPLE_RATIO

    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    raw = packer.compress(b"id,note\n1,a\n" + bytes(256 << 20)) + packer.flush()  # 256 MiB of NULs
    sample = sample_from_head(raw, Source(0, "http://h/bomb.csv.gz", "bomb.csv.gz", "csv"), tmp_path)
    assert Path(sample.url).stat().st_size <= max(len(raw) * MAX_SAMPLE_RATIO, 1 << 20)
    assert Path(sample.url).read_bytes() == b"id,note\n1,a\n"  # cut after the last whole record

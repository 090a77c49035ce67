"""CSV parsed in the workers: cutting at record ends, line numbers, malformed rows."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.core.chunks import (
    parse_csv_chunk,
)
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import Source, StagedFile
from etl.read.formats import read_chunks

pytestmark = pytest.mark.timeout(60)


def staged(path: Path) -> StagedFile:
    return StagedFile(Source(0, str(path), path.name, "csv"), path, path.stat().st_size)


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("id", "note", "n")) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def start_lines(path: Path) -> dict[str, int]:
    """id -> file line where its record starts, by Python's csv module (the reference)."""
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    found = {}
    while True:
        before = reader.line_num
        record = next(reader, None)
        if record is None:
            return found
        if record:
            found[record[0]] = before + 1


def frames(path: Path, cfg: ReadConfig, on_error: str = "fail") -> list:
    return [parse_csv_chunk(c, cfg, on_error) for c in read_chunks(staged(path), cfg)]


NOTES = ["plain", "comma, inside", "two\nlines", "", 'say "hi"', "three\n\nlines", "\n"]


@settings(max_examples=40, deadline=None)
@given(
    notes=st.lists(st.sampled_from(NOTES), min_size=1, max_size=60),
    chunk_rows=st.integers(1, 9),
)
def test_chunks_hold_every_record_once_indexed_by_its_start_line(
    tmp_path_factory: pytest.TempPathFactory, notes: list[str], chunk_rows: int
) -> None:
    path = write_csv(
        tmp_path_factory.mktemp("csv") / "t.csv.gz", [[str(i), n, str(i * 2)] for i, n in enumerate(notes)]
    )
    cfg = ReadConfig(chunk_rows=chunk_rows)

    parsed = frames(path, cfg)

    ids = [v for df, _ in parsed for v in df["id"]]
    assert ids == [str(i) for i in range(len(notes))]
    assert [v for df, _ in parsed for v in df["note"].fillna("")] == notes
    lines = start_lines(path)
    assert {str(i): line for df, _ in parsed for i, line in zip(df["id"], df.index)} == lines


def test_malformed_rows_fail_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('id,note,n\n1,a,2\n2,"x\ny",3\n3,b,4,extra\n4,c,5\n')

    with pytest.raises(DataError) as e:
        frames(path, ReadConfig(chunk_rows=100))

    assert "line 5" in e.value.message and "expected 3 fields" in e.value.message and "got 4" in e.value.message
    assert e.value.item == "bad.csv[chunk 0, lines 2-6]"


def test_malformed_rows_are_rejected_with_their_line_and_raw_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('id,note,n\n1,a,2\n2,"x\ny",3\n3,b,4,extra\n4\n5,c,6\n')

    [(df, rejects)] = frames(path, ReadConfig(chunk_rows=100), on_error="quarantine")

    assert list(df["id"]) == ["1", "2", "5"] and list(df.index) == [2, 3, 7]
    assert list(rejects["_row"]) == [5, 6]
    assert [json.loads(r) for r in rejects["_raw"]] == ["3,b,4,extra", "4"]
    assert list(rejects["_step"]) == ["read", "read"]
    assert "expected 3 fields as in the header, got 4" in rejects["_reason"].iloc[0]


@pytest.mark.parametrize("chunk_rows", [2, 5])
def test_stray_quote_in_an_unquoted_field_is_reported_not_misread(tmp_path: Path, chunk_rows: int) -> None:
    # A quote inside an unquoted field breaks the quote count that finds record ends, so a
    # cut can fall inside the next quoted field: the worker's parse must notice.
    path = tmp_path / "inch.csv"
    path.write_text("id,size,n\n" + "".join(f'{i},12" pipe,ok\n{i}b,x,"multi\nline"\n' for i in range(50)))

    with pytest.raises(DataError, match='read.parse = "reader"'):
        frames(path, ReadConfig(chunk_rows=chunk_rows))
    reader = ReadConfig(chunk_rows=chunk_rows, parse="reader")  # the reader-side parser reads it
    assert sum(c.rows for c in read_chunks(staged(path), reader)) == 100


def test_bare_carriage_returns_ask_for_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "mac.csv"
    path.write_bytes(b"a,b\r1,2\r3,4\r")
    with pytest.raises(DataError, match=r'bare carriage return .*read.parse = "reader"'):
        list(read_chunks(staged(path), ReadConfig()))


def test_bom_blank_lines_and_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_bytes(b"\xef\xbb\xbfid,note\r\n1,a\r\n\r\n2,b\r\n3,c")

    [(df, _)] = frames(path, ReadConfig())

    assert list(df.columns) == ["id", "note"]
    assert list(df["id"]) == ["1", "2", "3"] and list(df.index) == [2, 4, 5]


# ------------------------------------------------- long records, bombs, byte targets (issue 18)


def rows_of(path: Path, cfg: ReadConfig) -> list[tuple[int, str, str]]:
    """(start line, id, note) of every row, parsed as the workers parse them."""
    out = []
    for chunk in read_chunks(staged(path), cfg):
        df, _ = parse_csv_chunk(chunk, cfg, "fail")
        out += [(int(line), str(i), str(note)) for line, i, note in zip(df.index, df["id"], df["note"])]
    return out


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("quoted", [False, True])
def test_a_record_of_several_mib_is_read_whole_wherever_it_sits(tmp_path: Path, where: str, quoted: bool) -> None:
    long = ("ab\ncd" if quoted else "x") * (3 << 20 if not quoted else 700_000)  # 3 MiB, past pyarrow's 1 MiB block
    rows = [[str(i), "short", "1"] for i in range(50)]
    at = {"first": 0, "middle": 25, "last": 50}[where]
    rows.insert(at, ["L", long, "1"])
    path = write_csv(tmp_path / "long.csv", rows)
    cfg = ReadConfig(chunk_rows=10)
    got = rows_of(path, cfg)
    assert [(i, note) for _, i, note in got] == [(r[0], r[1]) for r in rows]
    assert got[at][0] == 2 + at  # named by the line it starts on


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_a_record_longer_than_max_record_bytes_fails_naming_file_and_line(tmp_path: Path, suffix: str) -> None:
    path = write_csv(tmp_path / f"long{suffix}", [["1", "a", "1"], ["2", "x" * (3 << 20), "1"], ["3", "b", "1"]])
    with pytest.raises(DataError) as info:
        rows_of(path, ReadConfig(max_record_bytes="2MiB"))  # type: ignore[arg-type]
    assert info.value.item == f"{path.name}[line 3]"
    assert "record starting at line 3 is 3145733 bytes, longer than read.max_record_bytes (2097152)" in str(info.value)
    # past the chunk's byte target, the reader itself stops at max_record_bytes
    small = ReadConfig(chunk_rows=1, max_record_bytes="2MiB")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="record starting at line 3 is longer than read.max_record_bytes") as info:
        list(read_chunks(staged(path), small))
    assert info.value.item == f"{path.name}[line 3]"


class Counting(io.RawIOBase):
    """A stream that counts what is read from it (to show decompression is bounded)."""

    def __init__(self, inner: io.BufferedIOBase) -> None:
        self.inner, self.read_bytes = inner, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.read_bytes += len(data)
        return data


def test_a_gzip_bomb_is_decompressed_no_further_than_max_record_bytes(tmp_path: Path) -> None:
    from etl.read.csv_cut import MAX_CHUNK_BYTES, split_csv

    path = tmp_path / "bomb.csv.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b"id,note\n1,a\n")
        for _ in range(64):  # 1 GiB of NUL bytes in about 1 MiB of gzip
            f.write(bytes(16 << 20))
    stream = Counting(gzip.open(path, "rb"))  # type: ignore[arg-type]
    cfg = ReadConfig(max_record_bytes="4MiB")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"record starting at line 3 is longer than read.max_record_bytes"):
        list(split_csv(stream, staged(path), cfg))  # type: ignore[arg-type]
    assert stream.read_bytes < MAX_CHUNK_BYTES + (8 << 20)  # one chunk's target and one record: not the GiB behind
    # the same file through the reader stage's entry point: a DataError, not a MemoryError
    with pytest.raises(DataError, match=r"bomb.csv.gz\[line 3\]"):
        list(read_chunks(staged(path), cfg))


def test_chunk_targets_are_bytes_capped_whatever_the_first_lines_look_like(tmp_path: Path) -> None:
    from etl.read.csv_cut import MAX_CHUNK_BYTES

    wide = [[str(i), "w" * 20_000, "1"] for i in range(3000)]  # 20 KB rows: 60 MB
    path = write_csv(tmp_path / "wide.csv", wide)
    chunks = list(read_chunks(staged(path), ReadConfig()))  # 200,000 rows would be 4 GB
    assert len(chunks) >= 2 and max(len(c.data) for c in chunks) <= MAX_CHUNK_BYTES
    assert sum(c.rows for c in chunks) == 3000


# ------------------------------------------- records past max_record_bytes, set aside


def set_aside_run(path: Path, cfg: ReadConfig) -> tuple[list[tuple[int, str, str]], list[dict]]:
    """(start line, id, note) of the rows kept, and the dead-letter rows, as the workers make them."""
    from etl.core.chunks import decode_chunk
    from etl.core.parts import encode_rejects

    kept, dead = [], []
    chunks = list(read_chunks(staged(path), cfg, set_aside=True))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        df, bad = decode_chunk(chunk, cfg, "quarantine")
        kept += [(int(line), str(i), str(note)) for line, i, note in zip(df.index, df["id"], df["note"])]
        if bad is not None:
            dead += [json.loads(x) for x in encode_rejects(bad, chunk).data.splitlines()]
    return kept, dead


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("quoted", [False, True])
def test_a_record_longer_than_max_record_bytes_is_set_aside_and_the_rest_read_on(
    tmp_path: Path, suffix: str, where: str, quoted: bool
) -> None:
    long = ("ab\ncd" if quoted else "x") * (600_000 if quoted else 3 << 20)  # 3 MiB, 2 MiB allowed
    rows = [[str(i), "short", "1"] for i in range(40)]
    at = {"first": 0, "middle": 20, "last": 40}[where]
    rows.insert(at, ["L", long, "1"])
    path = write_csv(tmp_path / f"long{suffix}", rows)
    for chunk_rows in (1, 7, 1000):
        cfg = ReadConfig(chunk_rows=chunk_rows, max_record_bytes="2MiB")  # type: ignore[arg-type]
        kept, dead = set_aside_run(path, cfg)
        extra = long.count("\n")  # lines the long record adds after its first
        want = [(2 + j + (extra if j > at else 0), r[0], r[1]) for j, r in enumerate(rows) if r[0] != "L"]
        assert kept == want  # every other row, by its line
        (letter,) = dead
        assert letter["source"] == path.name and letter["line"] == 2 + at
        assert letter["step"] == "read"
        assert letter["reason"].startswith("record longer than read.max_record_bytes (2.0 MiB): ")
        assert len(letter["raw"]) <= 1024 and letter["raw"].startswith('L,"ab' if quoted else "L,xxx")


def test_a_quoted_field_that_never_closes_is_set_aside_to_the_end_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "open.csv"
    path.write_bytes(b'id,note,n\n1,a,1\n2,"never closed' + b"z\n" * (2 << 20))
    cfg = ReadConfig(max_record_bytes="1MiB")  # type: ignore[arg-type]
    kept, dead = set_aside_run(path, cfg)
    assert kept == [(2, "1", "a")]
    assert dead[0]["line"] == 3 and "no record end before the end of the file" in dead[0]["reason"]


def test_skipping_a_record_holds_one_read_not_the_record(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "bomb.csv.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b"id,note\n1,a\n2,")
        for _ in range(16):  # a 256 MiB record in about 256 KiB of gzip
            f.write(bytes(16 << 20))
        f.write(b"\n3,b\n")
    cfg = ReadConfig(max_record_bytes="4MiB")  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        chunks = [
            (c.row_start, c.data, c.set_aside[0][0] if c.set_aside else None)
            for c in read_chunks(staged(path), cfg, set_aside=True)
        ]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chunks[1][2] == 3  # the record on line 3 set aside
    assert chunks[0][1] == b"1,a\n" and chunks[-1][1] == b"3,b\n"
    assert peak < 24 << 20  # max_record_bytes and a few reads, not the 256 MiB record


def test_a_header_longer_than_max_record_bytes_still_fails(tmp_path: Path) -> None:
    path = tmp_path / "head.csv"
    path.write_bytes(b"id," + b"h" * (2 << 20) + b"\n1,a\n")
    with pytest.raises(DataError, match="record starting at line 1 is longer than read.max_record_bytes"):
        list(read_chunks(staged(path), ReadConfig(max_record_bytes="1MiB"), set_aside=True))  # type: ignore[arg-type]


@pytest.mark.parametrize("on_error", ["quarantine", "fail"])
def test_a_run_quarantines_or_fails_on_a_record_past_max_record_bytes(tmp_path: Path, on_error: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    rows = [[str(i), "short", "1"] for i in range(30)]
    rows.insert(12, ["L", "y" * (3 << 20), "1"])
    write_csv(tmp_path / "big.csv.gz", rows)
    (tmp_path / "job.toml").write_text(
        f"""
[job]
name = "long"
state_dir = "state"
[sources]
urls = ["big.csv.gz"]
[read]
max_record_bytes = "2MiB"
chunk_rows = 5
[transform]
workers = 2
on_error = "{on_error}"
steps = [{{op = "cast", columns = {{n = "int64"}}}}]
[output]
path = "out"
"""
    )
    proc = subprocess.run(
        [sys.executable, str(root / "run.py"), "--config", str(tmp_path / "job.toml"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "Traceback" not in proc.stderr
    if on_error == "fail":
        assert proc.returncode == 1, proc.stderr
        assert "big.csv.gz" in proc.stderr and "line 14" in proc.stderr and "max_record_bytes" in proc.stderr
        assert not (tmp_path / "out").exists()
        return
    assert proc.returncode == 3, proc.stderr  # rows rejected
    letters = [
        json.loads(x) for f in (tmp_path / "out" / "_rejected").glob("*.jsonl") for x in f.read_text().splitlines()
    ]
    assert [(d["source"], d["line"], d["step"]) for d in letters] == [("big.csv.gz", 14, "read")]
    assert len(letters[0]["raw"]) == 1024
    import pyarrow.dataset as ds

    ids = sorted(int(i) for i in ds.dataset(tmp_path / "out", format="parquet").to_table()["id"].to_pylist())
    assert ids == list(range(30))

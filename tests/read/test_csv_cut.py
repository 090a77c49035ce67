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

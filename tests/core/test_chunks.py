"""The chunk codec (etl/core/chunks.py): byte counts, record ends, halves and heads, Arrow IPC.

Cutting real files and parsing their chunks end to end is tested with the reader, in
tests/read/test_csv_cut.py and tests/read/test_formats.py.
"""

from __future__ import annotations

import csv
import io
import sys

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from etl.core.chunks import (
    COUNT_BLOCK_BYTES,
    HEX_SCAN_HITS,
    _quotes_before,
    count_byte,
    decode_chunk,
    decode_ipc,
    encode_ipc,
    has_hex_prefix,
    head,
    parse_csv_chunk,
    record_end,
    split_chunk,
)
from etl.core.config import ReadConfig
from etl.core.records import Chunk

NOTES = ["plain", "with, comma", 'quote "inside"', "two\nlines", ""]


@given(st.binary(max_size=64), st.integers(0, 3), st.data())
def test_count_byte_agrees_with_bytes_count_across_blocks(piece: bytes, blocks: int, data: st.DataObject) -> None:
    buf = b'"\n' * (COUNT_BLOCK_BYTES * blocks // 2) + piece  # spans several numpy blocks
    start = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.integers(start, len(buf)))
    for byte in (b'"', b"\n"):
        assert count_byte(buf, byte, start, end) == buf.count(byte, start, end)


def test_count_byte_leaves_no_export_in_a_frame_someone_holds() -> None:
    """A profiler or debugger keeps frames (and their locals) after they return; the CSV
    cutter then resizes the bytearray it counted in, which any live export forbids."""
    held = []

    def keep_frames(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "return":
            held.append(frame)

    buf = bytearray(b'a,"b"\n' * 1000)
    sys.setprofile(keep_frames)
    try:
        assert count_byte(buf, b"\n") == 1000
    finally:
        sys.setprofile(None)
    assert held, "the profile hook saw no frame"
    del buf[:6]  # BufferError while a held frame still exported buf
    assert len(buf) == 5994


def test_record_end_never_cuts_inside_quotes() -> None:
    buf = b'1,"a\nb",2\n3,"c",4\n'
    assert record_end(buf, 4) == 10  # the newline at 4 is quoted: the first record ends at 10
    assert record_end(buf, 15) == 10
    assert record_end(buf, len(buf)) == len(buf)
    assert record_end(b'1,"open\n', 5) == 0  # no complete record yet


def test_halves_and_head_keep_whole_records_and_their_lines() -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([i, NOTES[i % len(NOTES)], 1] for i in range(40))
    text = out.getvalue().encode()
    cfg = ReadConfig(chunk_rows=1000)
    chunk = Chunk(0, "t.csv", 0, 2, text.count(b"\n"), text, kind="csv", columns=("id", "note", "n"))
    whole, _ = parse_csv_chunk(chunk, cfg, "fail")

    halves = split_chunk(chunk)

    assert halves is not None
    parts = [parse_csv_chunk(h, cfg, "fail")[0] for h in halves]
    assert list(parts[0]["id"]) + list(parts[1]["id"]) == list(whole["id"])
    assert list(parts[0].index) + list(parts[1].index) == list(whole.index)
    first, _ = parse_csv_chunk(head(chunk, 10), cfg, "fail")
    assert list(first["id"]) == list(whole["id"][: len(first)]) and 5 <= len(first) <= 10


def test_one_record_cannot_be_split() -> None:
    chunk = Chunk(0, "t.csv", 0, 2, 1, b"1,a,2\n", kind="csv", columns=("id", "note", "n"))
    assert split_chunk(chunk) is None


def test_arrow_chunks_round_trip_split_and_head_by_rows() -> None:
    table = pa.table({"id": pa.array(range(10), pa.int64()), "s": pa.array([str(i) for i in range(10)])})
    chunk = Chunk(3, "t.parquet", 7, 100, 10, encode_ipc(table))
    assert decode_ipc(chunk.data).equals(table)
    df, rejects = decode_chunk(chunk, ReadConfig(), "fail")
    assert rejects is None and list(df.index) == list(range(100, 110)) and list(df["id"]) == list(range(10))
    halves = split_chunk(chunk)
    assert halves is not None
    assert [(h.row_start, h.rows, h.index) for h in halves] == [(100, 5, 7), (105, 5, 7)]
    assert pa.concat_tables([decode_ipc(h.data) for h in halves]).equals(table)
    first = head(chunk, 4)
    assert first.rows == 4 and decode_ipc(first.data).equals(table.slice(0, 4))


# ------------------------------------------------------------------- typed parsing

TYPES = {"id": pa.int64(), "fare": pa.float64()}


def csv_chunk(text: bytes, columns: tuple[str, ...] = ("id", "fare", "note")) -> Chunk:
    return Chunk(0, "t.csv", 0, 2, text.count(b"\n"), text, kind="csv", columns=columns)


def test_typed_parse_reads_the_given_columns_as_their_types() -> None:
    chunk = csv_chunk(b'1," 12.5 ",a\n2,,"b, c"\n3,7,"d\ne"\n')
    df, rejects = parse_csv_chunk(chunk, ReadConfig(), "fail", TYPES)
    assert rejects is None and list(df.index) == [2, 3, 4]
    assert str(df["id"].dtype) == "int64[pyarrow]" and str(df["fare"].dtype) == "double[pyarrow]"
    assert str(df["note"].dtype) == "string[pyarrow]"
    assert df["fare"].tolist()[0] == 12.5 and df["fare"].isna().tolist() == [False, True, False]


def test_a_chunk_the_typed_parse_refuses_is_parsed_as_text() -> None:
    """A bad value (or a blank one, which the cast nulls after trimming) leaves every column
    text, so the cast step finds and names it as without typed parsing."""
    for text in (b"1,n/a,a\n2,3,b\n", b'1,"  ",a\n', b'1,"",a\n', b"1.0,3,a\n"):
        df, _ = decode_chunk(csv_chunk(text), ReadConfig(), "fail", TYPES)
        assert all(str(t) == "string[pyarrow]" for t in df.dtypes), text


def test_hex_text_keeps_integer_columns_as_text() -> None:
    """Arrow's CSV reader reads 0x1F as 31; the cast calls it a bad value."""
    df, _ = parse_csv_chunk(csv_chunk(b"0x1F,2.5,a\n"), ReadConfig(), "fail", TYPES)
    assert str(df["id"].dtype) == "string[pyarrow]" and str(df["fare"].dtype) == "double[pyarrow]"


def test_typed_parse_skips_malformed_rows_like_the_text_parse() -> None:
    chunk = csv_chunk(b"1,2.5,a\n2,3\n3,4,b\n")
    typed = parse_csv_chunk(chunk, ReadConfig(), "skip", TYPES)
    text = parse_csv_chunk(chunk, ReadConfig(), "skip")
    assert list(typed[0].index) == list(text[0].index) == [2, 4]
    assert typed[1] is not None and text[1] is not None and typed[1].equals(text[1])


@given(st.lists(st.sampled_from([b"0", b"x", b"X", b"a", b",", b"0x", b"\n"]), max_size=40))
def test_has_hex_prefix_is_a_search_for_0x(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert has_hex_prefix(data) is (b"0x" in data or b"0X" in data)


def test_has_hex_prefix_past_many_letters() -> None:
    """Past ``HEX_SCAN_HITS`` letters numpy scans the rest; a 0x there is found, a text of
    letters without one is not."""
    many = b"box,fox\n" * HEX_SCAN_HITS
    assert not has_hex_prefix(many)
    assert has_hex_prefix(many + b"1,0x1F\n")
    assert has_hex_prefix(many.upper() + b"1,0X1F\n")
    assert not has_hex_prefix(b"x0" + many)


@given(st.binary(max_size=300).map(lambda b: bytes(b'"\na,'[x % 4] for x in b)), st.data())
def test_quotes_before_counts_the_quotes_before_each_position(text: bytes, data: st.DataObject) -> None:
    """The bitmap count equals the plain one (the quotes' positions searched), across word ends."""
    buf = np.frombuffer(text, dtype=np.uint8)
    positions = np.array(sorted(data.draw(st.sets(st.integers(0, max(len(text) - 1, 0))))) if text else [], np.int64)
    want = np.searchsorted(np.flatnonzero(buf == ord('"')), positions)
    assert _quotes_before(buf, positions).tolist() == want.tolist()

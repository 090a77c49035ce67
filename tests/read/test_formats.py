"""Reading staged files into chunks: real files in tmp_path, compared with pandas' reader."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.core.chunks import decode_ipc, parse_csv_chunk
from etl.core.config import OutputConfig, ReadConfig
from etl.core.errors import ConfigError, DataError
from etl.core.parts import encode_table
from etl.core.records import Chunk, Source, StagedFile
from etl.read.formats import read_chunks

pytestmark = pytest.mark.timeout(30)


def staged(path: Path, fmt: str, index: int = 2) -> StagedFile:
    return StagedFile(Source(index, str(path), path.name, fmt), path, path.stat().st_size)  # type: ignore[arg-type]


def decoded(chunk: Chunk, cfg: ReadConfig) -> pa.Table:
    """A chunk's rows as the worker sees them: Arrow IPC, or raw CSV parsed."""
    if chunk.kind == "arrow":
        return decode_ipc(chunk.data)
    return pa.Table.from_pandas(parse_csv_chunk(chunk, cfg, "fail")[0], preserve_index=False)


def table_of(chunks: list[Chunk], cfg: ReadConfig | None = None) -> pa.Table:
    return pa.concat_tables(decoded(c, cfg or ReadConfig()) for c in chunks)


def rows_of(chunks: list[Chunk], cfg: ReadConfig | None = None) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in table_of(chunks, cfg).to_pylist()]


PARSE_WHERE = pytest.mark.parametrize("parse", ["reader", "worker"])


def pandas_rows(path: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    df = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""])
    rows = [tuple(None if pd.isna(v) else v for v in row) for row in df.itertuples(index=False)]
    return list(df.columns), rows


def tricky_csv_bytes(n: int = 100) -> bytes:
    """Quoted commas and quotes, embedded newlines, empty values, non-ASCII, CRLF endings."""
    buf = io.StringIO()
    w = csv.writer(buf)  # quotes only where needed; lines end with \r\n
    w.writerow(["id", "name", "note", "amount"])
    for i in range(n):
        note = [f"plain {i}", f"comma, inside {i}", f"two\nlines {i}", "", 'say "hi"'][i % 5]
        name = "" if i % 7 == 3 else f"näme-{i}"
        w.writerow([i, name, note, f"{i * 1.5}" if i % 4 else ""])
    return buf.getvalue().encode("utf-8")


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".zst":
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        return sink.getvalue().to_pybytes()
    return data


def assert_chunk_shape(chunks: list[Chunk], total: int, size: int, name: str) -> None:
    expected = [size] * (total // size) + ([total % size] if total % size else [])
    assert [c.rows for c in chunks] == expected
    assert [c.index for c in chunks] == list(range(len(expected)))
    assert [c.row_start for c in chunks] == [i * size for i in range(len(expected))]
    assert {(c.source_index, c.source_name) for c in chunks} == {(2, name)}


# ----------------------------------------------------------------------------- CSV


@PARSE_WHERE
@pytest.mark.parametrize("suffix", ["", ".gz", ".zst", ".bz2"])
def test_csv_chunks_equal_pandas_rows_for_every_compression(tmp_path: Path, suffix: str, parse: str) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_bytes(tricky_csv_bytes())
    path = tmp_path / f"trips.csv{suffix}"
    path.write_bytes(compress(plain.read_bytes(), suffix))

    chunks = list(read_chunks(staged(path, "csv"), ReadConfig(chunk_rows=7, parse=parse)))  # type: ignore[arg-type]

    if parse == "reader":
        assert_chunk_shape(chunks, total=100, size=7, name=path.name)
    else:  # cut by bytes at record ends: about 7 lines each
        assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) > 10
    columns, expected = pandas_rows(plain)
    table = table_of(chunks)
    assert table.column_names == columns
    assert all(t == pa.string() for t in table.schema.types)  # types come from cast steps
    assert rows_of(chunks) == expected


def test_csv_chunk_boundaries_do_not_depend_on_block_size(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(tricky_csv_bytes(300))
    cfg = ReadConfig(chunk_rows=11, parse="reader")  # worker parsing cuts by bytes: no block size

    small = list(read_chunks(staged(path, "csv"), cfg, block_size=256))
    large = list(read_chunks(staged(path, "csv"), cfg, block_size=1 << 20))

    assert [(c.index, c.row_start, c.rows) for c in small] == [(c.index, c.row_start, c.rows) for c in large]
    assert [decode_ipc(c.data) for c in small] == [decode_ipc(c.data) for c in large]


@PARSE_WHERE
def test_csv_quoted_values_are_never_null(tmp_path: Path, parse: str) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b'a,b\n"",\n"NA",NA\n')
    cfg = ReadConfig(null_values=["", "NA"], parse=parse)  # type: ignore[arg-type]

    chunks = list(read_chunks(staged(path, "csv"), cfg))

    assert rows_of(chunks, cfg) == [("", None), ("NA", None)]


@PARSE_WHERE
@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_csv_delimiter_and_encoding_come_from_config(tmp_path: Path, parse: str, encoding: str) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("ville;prix\nMâcon;1,5\nSète;\n".encode(encoding))
    cfg = ReadConfig(delimiter=";", encoding=encoding, parse=parse)  # type: ignore[arg-type]

    chunks = list(read_chunks(staged(path, "csv"), cfg))

    assert rows_of(chunks, cfg) == [("Mâcon", "1,5"), ("Sète", None)]
    if encoding == "utf-16":  # newlines and quotes are two bytes: only the reader can parse it
        assert {c.kind for c in chunks} == {"arrow"}


def test_csv_unknown_encoding_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"a\n1\n")
    with pytest.raises(ConfigError, match="no-such-codec") as e:
        list(read_chunks(staged(path, "csv"), ReadConfig(encoding="no-such-codec")))
    assert e.value.item == "read.encoding"


@pytest.mark.parametrize(
    ("name", "fmt", "data"),
    [
        ("header.csv", "csv", b"a,b,c\n"),
        ("header-blank.csv", "csv", b"\r\n\na,b,c\r\n\n\n"),
        ("blank.csv", "csv", b"\n \n"),
        ("empty.csv", "csv", b""),
        ("empty.csv.gz", "csv", gzip.compress(b"")),
        ("blank.jsonl", "jsonl", b"\n\n"),
        ("empty.jsonl", "jsonl", b""),
        ("empty.parquet", "parquet", b""),
    ],
)
def test_files_without_rows_yield_no_chunks(tmp_path: Path, name: str, fmt: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    assert list(read_chunks(staged(path, fmt), ReadConfig(chunk_rows=5))) == []


@pytest.mark.parametrize("block_size", [128, None])
def test_csv_row_with_too_many_fields_names_file_line_and_chunk(tmp_path: Path, block_size: int | None) -> None:
    lines = ["id,name,city"] + [f"{i},n{i},c{i}" for i in range(1, 51)]
    lines[30] = "30,n30,c30,extra"  # data row 30, line 31
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as e:
        list(read_chunks(staged(path, "csv"), ReadConfig(chunk_rows=7, parse="reader"), block_size=block_size))

    assert e.value.item == "bad.csv[chunk 4]"  # data row 30 is in rows 28-34
    assert str(path) in e.value.message
    assert "line 31" in e.value.message
    assert "expected 3 fields" in e.value.message and "got 4" in e.value.message


@PARSE_WHERE
def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path: Path, parse: str) -> None:
    data = gzip.compress(tricky_csv_bytes(2000))
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DataError) as e:
        list(read_chunks(staged(path, "csv"), ReadConfig(chunk_rows=100, parse=parse)))  # type: ignore[arg-type]

    assert e.value.item.startswith("cut.csv.gz")
    assert str(path) in e.value.message
    assert "ended before the end-of-stream marker" in e.value.message  # ISA-L's gzip


def test_unknown_format_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match="unknown input format 'xml'"):
        list(read_chunks(staged(path, "xml"), ReadConfig()))


# ---------------------------------------------------------------------- JSON Lines


def jsonl_records(n: int = 60) -> list[dict[str, Any]]:
    """``note`` is null (or missing) in the first 20 records: the first block has no type."""
    records = []
    for i in range(n):
        rec: dict[str, Any] = {"id": i, "price": i + 0.25, "name": f"item {i}"}
        if i >= 20:
            rec["note"] = f"note {i}"
        elif i % 2:
            rec["note"] = None
        if i % 9 == 4:
            rec["name"] = None
        records.append(rec)
    return records


def test_jsonl_types_are_the_same_in_every_chunk(tmp_path: Path) -> None:
    records = jsonl_records()
    path = tmp_path / "items.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))

    chunks = list(read_chunks(staged(path, "jsonl"), ReadConfig(chunk_rows=7), block_size=300))

    assert_chunk_shape(chunks, total=60, size=7, name=path.name)
    expected = pa.schema([("id", pa.int64()), ("price", pa.float64()), ("name", pa.string()), ("note", pa.string())])
    assert {decode_ipc(c.data).schema for c in chunks} == {expected}
    fields = ["id", "price", "name", "note"]
    assert rows_of(chunks) == [tuple(r.get(f) for f in fields) for r in records]


@pytest.mark.parametrize("block_size", [400, None])  # None: the bad line is in the first block
def test_jsonl_invalid_line_names_file_and_line(tmp_path: Path, block_size: int | None) -> None:
    lines = [json.dumps(r) for r in jsonl_records()]
    lines[36] = '{"id": 36, broken'  # line 37
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as e:
        list(read_chunks(staged(path, "jsonl"), ReadConfig(chunk_rows=7), block_size=block_size))

    assert e.value.item == "bad.jsonl[chunk 5]"
    assert str(path) in e.value.message
    assert "line 37: not valid JSON" in e.value.message


def test_jsonl_type_change_after_first_block_names_field_and_line(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in jsonl_records()]
    lines[39] = json.dumps({"id": "forty", "price": 1.0})  # line 40: id was int64
    path = tmp_path / "drift.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as e:
        list(read_chunks(staged(path, "jsonl"), ReadConfig(chunk_rows=10), block_size=400))

    assert e.value.item == "drift.jsonl[chunk 3]"
    assert "line 40: field 'id' holds 'forty'" in e.value.message
    assert "int64" in e.value.message


# -------------------------------------------------------------------------- Parquet


def test_parquet_is_rechunked_across_row_groups_and_keeps_types(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array(range(100), pa.int64()),
            "score": pa.array([None if i % 5 == 0 else i / 3 for i in range(100)]),
            "name": pa.array([f"n{i}" if i % 3 else None for i in range(100)]),
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=13)

    chunks = list(read_chunks(staged(path, "parquet"), ReadConfig(chunk_rows=7)))

    assert_chunk_shape(chunks, total=100, size=7, name="t.parquet")
    assert table_of(chunks).equals(table)


def test_corrupt_parquet_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError) as e:
        list(read_chunks(staged(path, "parquet"), ReadConfig()))
    assert e.value.item == "junk.parquet[chunk 0]"
    assert str(path) in e.value.message


# ------------------------------------------------------------------------- encoding


def test_encode_table_writes_csv_with_header_and_empty_nulls() -> None:
    table = pa.table({"a": [1, None], "b": ["x,y", None]})
    data = encode_table(table, OutputConfig(path=Path("out"), format="csv"))
    assert data.decode().splitlines() == ['"a","b"', '1,"x,y"', ","]


# ------------------------------------------------------------- invalid text (issue 18)


@PARSE_WHERE
@pytest.mark.parametrize("where", ["data", "header"])
def test_invalid_utf8_names_the_line_and_points_to_read_encoding(tmp_path: Path, parse: str, where: str) -> None:
    path = tmp_path / "latin.csv"
    if where == "header":
        path.write_bytes(b'id,caf\xe9\n1,"x"\n')
        line = 1
    else:
        path.write_bytes(b"id,name\n" + b'1,"x"\n' * 5 + b'7,caf\xe9\n8,"y"\n')
        line = 7
    cfg = ReadConfig(parse=parse)  # type: ignore[arg-type]
    with pytest.raises(DataError) as info:
        for chunk in read_chunks(staged(path, "csv"), cfg):
            decoded(chunk, cfg)
    message = str(info.value)
    assert f"line {line}: bytes b'\\xe9" in message and "not valid utf-8 text" in message
    assert "read.encoding" in message and "quote" not in message
    latin = ReadConfig(parse=parse, encoding="latin-1")  # type: ignore[arg-type]
    assert "café" in str(table_of(list(read_chunks(staged(path, "csv"), latin)), latin).to_pylist()) + str(
        table_of(list(read_chunks(staged(path, "csv"), latin)), latin).column_names
    )


# ------------------------------------------------------- records longer than a block (issue 18)


@pytest.mark.parametrize("where", [0, 7])
def test_reader_parsed_records_longer_than_a_block_are_read_whole(tmp_path: Path, where: int) -> None:
    long = "x" * (5 << 20)  # past CSV_BLOCK_BYTES (4 MiB)
    rows = [[str(i), "a"] for i in range(10)]
    rows.insert(where, ["L", long])
    path = tmp_path / "long.csv"
    path.write_text("id,note\n" + "".join(f"{i},{n}\n" for i, n in rows))
    cfg = ReadConfig(parse="reader", chunk_rows=4)
    assert rows_of(list(read_chunks(staged(path, "csv"), cfg)), cfg) == [tuple(r) for r in rows]
    jsonl = tmp_path / "long.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "note": n + n}) + "\n" for i, n in rows))  # 10 MiB: past 8 MiB
    got = rows_of(list(read_chunks(staged(jsonl, "jsonl"), cfg)), cfg)
    assert got == [(i, n + n) for i, n in rows]


def test_reader_parsed_record_longer_than_max_record_bytes_fails_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("id,note\n1,a\n2," + "x" * (5 << 20) + "\n3,b\n")
    cfg = ReadConfig(parse="reader", max_record_bytes="2MiB")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"long.csv: the record at line 3 is longer than read.max_record_bytes"):
        list(read_chunks(staged(path, "csv"), cfg))

"""Reading staged files into chunks (``read_chunks``): real files in tmp_path, compared with pandas' reader;
exact chunks whatever the block size, empty files, records longer than a block."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from etl.core.chunks import decode_ipc
from etl.core.config import OutputConfig, ReadConfig
from etl.core.errors import ConfigError, DataError
from etl.core.parts import encode_table
from etl.read.formats import read_chunks
from tests.read.files import (
    PARSE_WHERE,
    assert_chunk_shape,
    compress,
    pandas_rows,
    rows_of,
    staged,
    table_of,
    tricky_csv_bytes,
)

pytestmark = pytest.mark.timeout(30)


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


def test_unknown_format_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match="unknown input format 'xml'"):
        list(read_chunks(staged(path, "xml"), ReadConfig()))


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


def test_encode_table_writes_csv_with_header_and_empty_nulls() -> None:
    table = pa.table({"a": [1, None], "b": ["x,y", None]})
    data = encode_table(table, OutputConfig(path=Path("out"), format="csv"))
    assert data.decode().splitlines() == ['"a","b"', '1,"x,y"', ","]

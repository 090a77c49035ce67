"""The per-format readers through ``read_chunks``: CSV, JSON Lines and Parquet types, and errors
that name the file, the chunk and the line (the locators)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.core.chunks import decode_ipc
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.read.formats import read_chunks
from tests.read.files import (
    PARSE_WHERE,
    assert_chunk_shape,
    decoded,
    jsonl_records,
    rows_of,
    staged,
    table_of,
)

pytestmark = pytest.mark.timeout(30)


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

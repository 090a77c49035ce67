"""Staged files for the read tests, and their chunks as the workers see them."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from etl.core.chunks import decode_ipc, parse_csv_chunk
from etl.core.config import ReadConfig
from etl.core.records import Chunk, Source, StagedFile


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

"""The per-format readers: pyarrow's C++ CSV, JSON Lines and Parquet readers as batches,
and, for the error path, where in a file a reader's error is.

``BATCH_SOURCES[format](staged, cfg, block_size, consumed)`` yields a file's record batches
of any size (``etl.read.formats`` regroups them into exact chunks); ``LOCATORS[format]``
re-reads a file that failed to find the first bad row after those already read, with its
line and what is wrong with it (pyarrow numbers rows within a block, or not at all).

CSV columns are all read as strings; JSON Lines keeps JSON's types, with the schema inferred
from the file's first block (null and timestamp-like fields loosened to strings) and
enforced on the rest; Parquet keeps its own types and is read in row batches.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from etl.core.chunks import csv_options, text_encoding, undecodable
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import StagedFile
from etl.read.long_lines import Aside
from etl.read.streams import STREAM_ERRORS, Consumed, compression, open_stream

CSV_BLOCK_BYTES = 4 << 20
"""Bytes pyarrow parses per CSV block: bigger means fewer round trips and more memory per
reader thread; one CSV row (embedded newlines included) must fit in a block."""
JSON_BLOCK_BYTES = 8 << 20
"""Bytes per JSON Lines block. The first block is also the sample the file's schema is
inferred from, so bigger means fewer "type changed later in the file" errors."""

BatchSource = Callable[[StagedFile, ReadConfig, int | None, Consumed], Iterator[pa.RecordBatch]]
Found = tuple[int, str]  # (1-based data row, what is wrong with it)
Locator = Callable[[StagedFile, ReadConfig, int | None, int, Exception], Found | None]


# ---------------------------------------------------------------------------- CSV


def _csv_batches(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    read, parse, convert = csv_options(cfg, block_size=block_size or CSV_BLOCK_BYTES)
    with (
        open_stream(staged, consumed, cfg) as stream,
        pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert) as reader,
    ):
        reader.schema.names  # noqa: B018 - raises UnicodeError here for a header that is not valid text
        yield from reader


def _locate_csv_error(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, skip: int, error: Exception
) -> Found | None:
    """Find the first record after the ``skip`` already read whose field count differs
    from the header's (error path only: pyarrow does not number the rows it rejects)."""
    if isinstance(error, UnicodeError) or "invalid UTF8" in str(error):
        return _locate_bad_text(staged, cfg.encoding)
    if "CSV parse error" not in str(error):
        return None  # not a row-shape problem: counting fields would blame the wrong row
    try:
        with open_stream(staged) as stream:
            text = io.TextIOWrapper(stream, encoding=cfg.encoding, errors="replace", newline="")
            records = csv.reader(text, delimiter=cfg.delimiter)
            width = len(next(records, []))
            rows = 0
            for record in records:
                if not record:
                    continue  # pyarrow skips empty lines too
                rows += 1
                if rows > skip and len(record) != width:
                    return rows, (
                        f"line {records.line_num} (data row {rows}): expected {width} fields "
                        f"as in the header, got {len(record)}: "
                        f"{cfg.delimiter.join(record)[:80]!r}"
                    )
    except STREAM_ERRORS + (csv.Error, LookupError):
        return None
    return None


def _locate_bad_text(staged: StagedFile, encoding: str) -> Found | None:
    """The first line that is not valid ``encoding`` text (error path only; read in blocks)."""
    decoder = codecs.getincrementaldecoder(text_encoding(encoding))()
    line, offset = 1, 0
    try:
        with open_stream(staged) as stream:
            while block := stream.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeError as e:
                    start = min(max(getattr(e, "start", 0), 0), len(block))
                    where = undecodable(block[: start + 4], encoding, line) or f"line {line}: not {encoding} text"
                    row = line + block.count(b"\n", 0, start) - 1  # the header is line 1
                    return max(row, 1), f"{where} (byte {offset + start} of the decompressed file)"
                line += block.count(b"\n")
                offset += len(block)
    except STREAM_ERRORS:
        return None
    return None


# ---------------------------------------------------------------------- JSON Lines


def _jsonl_batches(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    read = pajson.ReadOptions(block_size=block_size or JSON_BLOCK_BYTES)
    aside = consumed.aside
    if aside is not None:
        noted = Aside(aside.set_aside, header=False)
        try:
            schema = _jsonl_schema(staged, read, cfg, noted)
        except pa.ArrowInvalid:
            if not noted.found or not _nothing_but_long_lines(staged, cfg, consumed):
                raise
            return  # every line was set aside (noted in ``consumed.aside``): no rows, no schema
    else:
        schema = _jsonl_schema(staged, read)
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
    with (
        open_stream(staged, consumed, cfg) as stream,
        pajson.open_json(stream, read_options=read, parse_options=parse) as reader,
    ):
        yield from reader


def _nothing_but_long_lines(staged: StagedFile, cfg: ReadConfig, consumed: Consumed) -> bool:
    """Read the file through ``consumed``'s line filter: True when only blank text is left
    (every record was set aside, and noted there)."""
    with open_stream(staged, consumed, cfg) as stream:
        while block := stream.read(JSON_BLOCK_BYTES):
            if block.strip():
                return False
    return True


def _jsonl_schema(
    staged: StagedFile, read: pajson.ReadOptions, cfg: ReadConfig | None = None, aside: Aside | None = None
) -> pa.Schema:
    """The schema pyarrow infers from the first block, loosened (see ``_loosen``); with an
    ``aside``, from the lines not too long."""
    with open_stream(staged, None, cfg, aside) as stream, pajson.open_json(stream, read_options=read) as first:
        return pa.schema([f.with_type(_loosen(f.type)) for f in first.schema])


def _loosen(t: pa.DataType) -> pa.DataType:
    """Null and inferred timestamp types become string: later rows may hold any text."""
    if pa.types.is_null(t) or pa.types.is_timestamp(t):
        return pa.string()
    if pa.types.is_list(t):
        return pa.list_(_loosen(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_loosen(f.type)) for f in t])
    return t


def _locate_json_error(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, skip: int, error: Exception
) -> Found | None:
    """Find the first bad line after the ``skip`` records already read (error path only).

    pyarrow numbers rows within a block, not the file, so the file is re-read here:
    records up to ``skip`` are passed over unparsed, then each line is checked.
    """
    read = pajson.ReadOptions(block_size=block_size or JSON_BLOCK_BYTES)
    try:
        schema: pa.Schema | None = _jsonl_schema(staged, read)
    except (pa.ArrowException, OSError):
        schema = None  # the first block itself is broken: check the syntax only
    try:
        with open_stream(staged) as stream:
            records = 0
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                records += 1
                if records > skip and (problem := _json_line_problem(line, schema)):
                    return records, f"line {number}: {problem}"
    except STREAM_ERRORS:
        return None  # e.g. broken compression: pyarrow's message is all there is
    return None


def _json_line_problem(line: bytes, schema: pa.Schema | None) -> str | None:
    try:
        record = json.loads(line)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {line.strip()[:80]!r}"
    if schema is None:
        return None
    for key, value in record.items():
        index = schema.get_field_index(key)
        if index < 0:
            return (
                f"field {key!r} is not in the schema inferred from the file's first block "
                f"(fields: {', '.join(schema.names)})"
            )
        field = schema.field(index)
        if not _fits(value, field.type):
            return (
                f"field {key!r} holds {value!r}, but the file's first block made it "
                f"{field.type}; every row must fit the types inferred from that block"
            )
    return None


def _fits(value: Any, t: pa.DataType) -> bool:
    """Whether pyarrow's JSON reader can put this parsed JSON value into type ``t``."""
    if value is None:
        return True
    if pa.types.is_boolean(t):
        return isinstance(value, bool)
    if pa.types.is_integer(t):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(t):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_string(t):
        return isinstance(value, str)
    if pa.types.is_list(t):
        return isinstance(value, list) and all(_fits(v, t.value_type) for v in value)
    if pa.types.is_struct(t):
        return isinstance(value, dict)
    return True  # a type not inferred by the JSON reader: do not guess


# -------------------------------------------------------------------------- Parquet


def _parquet_batches(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    if compression(staged):
        raise DataError(
            f"{staged.path.name}: Parquet compresses inside the file; an outer "
            f"{compression(staged)} layer is not supported, decompress it first",
            item=staged.source.name,
        )
    with pq.ParquetFile(staged.path) as f:
        total, read = max(f.metadata.num_rows, 1), 0
        consumed.reach(0)
        for batch in f.iter_batches(batch_size=cfg.chunk_rows):
            read += batch.num_rows
            consumed.reach(consumed.size * read // total)
            yield batch


BATCH_SOURCES: dict[str, BatchSource] = {
    "csv": _csv_batches,
    "jsonl": _jsonl_batches,
    "parquet": _parquet_batches,
}

LOCATORS: dict[str, Locator] = {
    "csv": _locate_csv_error,
    "jsonl": _locate_json_error,
}

"""The chunk codec: how a ``Chunk``'s payload is made by readers and taken apart by workers.

A chunk crosses from a reader thread to a worker process as plain bytes (see
``etl.core.records``), in one of two kinds:

* ``arrow``: an Arrow IPC stream (``encode_ipc``/``decode_ipc``; uncompressed, because a
  memcpy through a pipe is cheapest, and decoded zero-copy), for JSON Lines and Parquet
  sources and for CSV read with ``read.parse = "reader"``;
* ``csv``: raw CSV text cut at record ends, without the header (its names travel in
  ``Chunk.columns``), parsed in the worker by ``parse_csv_chunk``.

Where a CSV record ends (``record_end``): a newline ends a record unless it is inside a
quoted field, and it is inside one exactly when an odd number of quote characters
precede it since the last record boundary (RFC 4180). Quotes and newlines are counted by
numpy in blocks (``count_byte``), with the GIL released.

Parsing (``parse_csv_chunk``, in the worker): pyarrow's CSV reader with ``csv_options``
(every column a string, ``read.null_values`` null unless quoted), single-threaded (the
pool is the parallelism). Rows are indexed by the file line where each record starts.
Rows with the wrong number of fields fail the chunk naming the line, or with
``transform.on_error = "skip" | "quarantine"`` are rejected like a bad value (step
``read``, the raw line kept).

``decode_chunk`` turns either kind into a DataFrame; ``split_chunk`` halves a chunk (a
worker killed by the OOM killer gets half as much) and ``head`` keeps its first rows
(the planner's warm-up chunk).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Mapping
from typing import cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from etl.core.config import ReadConfig
from etl.core.errors import ConfigError, DataError
from etl.core.records import Chunk

COUNT_BLOCK_BYTES = 1 << 18  # bytes compared per numpy call: fits in L2 so the mask stays in cache
QUOTE = b'"'
ZERO = ord("0")
HEX_SCAN_HITS = 64  # letters x checked one by one before numpy scans the whole chunk (fixed cost ~1 ms)
REJECT_STEP = "read"  # the dead-letter ``step`` of rows with the wrong number of fields


# ------------------------------------------------------------------------ Arrow IPC


def encode_ipc(table: pa.Table | pa.RecordBatch) -> bytes:
    """Arrow IPC stream bytes (uncompressed: chunks cross a pipe, where a memcpy is cheapest)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return cast(bytes, sink.getvalue().to_pybytes())


def decode_ipc(data: bytes | bytearray) -> pa.Table:
    """The table in ``encode_ipc`` bytes; zero-copy, the table points into ``data``."""
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_all()


# -------------------------------------------------------------------------- reading


# ------------------------------------------------------------------------------ CSV


def csv_options(
    cfg: ReadConfig, *, columns: tuple[str, ...] = (), block_size: int | None = None
) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """pyarrow's options for the job's CSV; ``columns`` given means the text has no header."""
    read = pacsv.ReadOptions(encoding=text_encoding(cfg.encoding))
    if block_size:
        read.block_size = block_size
    if columns:
        read.column_names, read.use_threads = list(columns), False  # one core per worker
    parse = pacsv.ParseOptions(delimiter=cfg.delimiter, newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        default_column_type=pa.string(),  # every column, whatever the header holds
        null_values=cfg.null_values,
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    return read, parse, convert


def text_encoding(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise ConfigError(f"unknown text encoding {name!r}", key="read.encoding") from None


def count_byte(buf: bytes | bytearray, byte: bytes, start: int = 0, end: int | None = None) -> int:
    """How many times ``byte`` occurs in ``buf[start:end]``, counted by numpy in blocks."""
    view = np.frombuffer(buf, dtype=np.uint8)
    end = len(buf) if end is None else end
    code, total = byte[0], 0
    try:
        for i in range(start, end, COUNT_BLOCK_BYTES):
            total += int(np.count_nonzero(view[i : min(i + COUNT_BLOCK_BYTES, end)] == code))
    finally:
        # ``buf`` may be a bytearray its owner resizes next: drop the export now, not
        # whenever a frame someone still holds (a debugger, a sampler) lets it go
        del view
    return total


def record_end(buf: bytes | bytearray, target: int) -> int:
    """Index just past the last record end at or before ``target`` (the first one after
    it when there is none before); 0 when ``buf`` holds no complete record."""
    nl = buf.rfind(b"\n", 0, target)
    odd = count_byte(buf, QUOTE, 0, nl) % 2 if nl >= 0 else 0
    while nl >= 0 and odd:  # inside a quoted field: step back a line
        prev = buf.rfind(b"\n", 0, nl)
        odd ^= buf.count(QUOTE, prev + 1, nl) % 2
        nl = prev
    if nl >= 0:
        return nl + 1
    start, odd = 0, 0
    nl = buf.find(b"\n")
    while nl >= 0:
        odd ^= buf.count(QUOTE, start, nl) % 2
        if not odd:
            return nl + 1
        start, nl = nl, buf.find(b"\n", nl + 1)
    return 0


def parse_csv_chunk(
    chunk: Chunk, cfg: ReadConfig, on_error: str, types: Mapping[str, pa.DataType] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The chunk's rows as a DataFrame indexed by file line, and its malformed rows as
    rejects (``on_error`` other than ``fail``; ``etl.transform.steps`` rejects have the same columns).

    ``types``: columns parsed straight to these types instead of text (the job's first
    casts, ``etl.transform.steps.typed_columns``): no text column is built, trimmed and
    cast for them. A chunk where any value does not parse so, or that is malformed, is
    parsed again as text, so its bad values are found and named as they are without
    ``types`` (the steps see the same values either way: a typed parse accepts only what
    the text path's cast would give the same value, see ``_typed_parse``)."""
    if types:
        typed = _typed_parse(chunk, cfg, on_error, types)
        if typed is not None:
            return typed
    read, parse, convert = csv_options(cfg, columns=chunk.columns)
    bad: list[tuple[int, str, str]] = []  # (record number within the chunk, reason, raw text)
    if on_error != "fail":
        parse.invalid_row_handler = _rejecter(bad)
    try:
        try:
            table = pacsv.read_csv(
                pa.py_buffer(chunk.data), read_options=read, parse_options=parse, convert_options=convert
            )
        except pa.ArrowInvalid as e:
            if "straddling" not in str(e):
                raise
            # A record longer than pyarrow's block (1 MiB): parse the chunk as one block.
            # Readers cut chunks at record ends, so the chunk bounds the longest record.
            line, size = _longest_record(chunk)
            if size > cfg.max_record_bytes:
                raise DataError(
                    f"the record starting at line {line} is {size} bytes, longer than "
                    f"read.max_record_bytes ({cfg.max_record_bytes}); raise it if records this long are real",
                    item=f"{chunk.source_name}[line {line}]",
                ) from e
            bad.clear()
            read.block_size = len(chunk.data) + 1
            table = pacsv.read_csv(
                pa.py_buffer(chunk.data), read_options=read, parse_options=parse, convert_options=convert
            )
    except (pa.ArrowException, UnicodeError) as e:
        if bad_text := undecodable(chunk.data, cfg.encoding, chunk.row_start):
            raise DataError(f"cannot parse CSV: {bad_text}", item=chunk.label) from e
        hint = (
            '; if the file has quote characters inside unquoted fields, set read.parse = "reader"'
            if QUOTE in chunk.data
            else ""
        )
        raise DataError(f"cannot parse CSV: {_locate(chunk, cfg, e)}{hint}", item=chunk.label) from e
    return _frame(chunk, table, bad)


def _rejecter(bad: list[tuple[int, str, str]]) -> Callable[[pacsv.InvalidRow], str]:
    """pyarrow's invalid-row handler: a row with the wrong number of fields is noted in
    ``bad`` (record number within the chunk, reason, raw text) and skipped."""

    def skip(row: pacsv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} fields as in the header, got {row.actual_columns}"
        bad.append((row.number or 0, reason, row.text))
        return "skip"

    return skip


def _typed_parse(
    chunk: Chunk, cfg: ReadConfig, on_error: str, types: Mapping[str, pa.DataType]
) -> tuple[pd.DataFrame, pd.DataFrame | None] | None:
    """The chunk parsed with ``types`` for those of its columns; None when any value of
    them does not parse (or anything else fails): the caller parses it as text.

    Arrow's CSV reader reads integers written ``0x1F`` as hex; the text path's cast calls
    them bad values, so a chunk holding ``0x`` anywhere keeps its integer columns as text."""
    hex_text = has_hex_prefix(chunk.data)
    column_types = {
        name: t for name, t in types.items() if name in chunk.columns and not (hex_text and pa.types.is_integer(t))
    }
    if not column_types:
        return None
    read, parse, convert = csv_options(cfg, columns=chunk.columns)
    convert.column_types = column_types
    bad: list[tuple[int, str, str]] = []  # (record number within the chunk, reason, raw text)
    if on_error != "fail":
        parse.invalid_row_handler = _rejecter(bad)
    try:
        table = pacsv.read_csv(
            pa.py_buffer(chunk.data), read_options=read, parse_options=parse, convert_options=convert
        )
    except (pa.ArrowException, UnicodeError):
        return None
    return _frame(chunk, table, bad)


def has_hex_prefix(data: bytes | bytearray) -> bool:
    """Whether ``data`` holds ``0x`` or ``0X``. Searched by its rare byte (``x``, by memchr)
    rather than by ``in``, which stops at every ``0`` (18 ms per 10 MB chunk of numbers,
    against 0.3 ms); numpy takes over when ``x`` is frequent (free text)."""
    for letter in (b"x", b"X"):
        pos = data.find(letter, 1)
        for _ in range(HEX_SCAN_HITS):
            if pos < 0:
                break
            if data[pos - 1] == ZERO:
                return True
            pos = data.find(letter, pos + 1)
        if pos >= 0:  # many letters: scan the rest at once
            view = np.frombuffer(data, dtype=np.uint8)
            at = np.flatnonzero(view[1:] == letter[0])  # the index of the byte before each letter
            if bool((view[at] == ZERO).any()):
                return True
    return False


def _frame(chunk: Chunk, table: pa.Table, bad: list[tuple[int, str, str]]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The parsed table as a DataFrame indexed by file line, and the malformed rows."""
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    if not bad and table.num_rows == chunk.rows:
        df.index = pd.RangeIndex(chunk.row_start, chunk.row_start + chunk.rows)  # one record per line
        return df, None
    starts = _record_lines(chunk, table.num_rows + len(bad))
    skipped = np.zeros(len(starts), dtype=bool)
    skipped[[n - 1 for n, _, _ in bad]] = True
    df.index = pd.Index(starts[~skipped])
    return df, _malformed(starts, bad) if bad else None


def undecodable(data: bytes | bytearray, encoding: str, first_line: int) -> str | None:
    """Where ``data`` (text starting at file line ``first_line``) is not valid in
    ``encoding``, said for the user; None when it decodes (error path only)."""
    try:
        codecs.decode(data, text_encoding(encoding))
    except UnicodeError as e:
        start = getattr(e, "start", 0)
        line = first_line + data.count(b"\n", 0, start)
        found, column = bytes(data[start : start + 4]), start - data.rfind(b"\n", 0, start)
        return (
            f"line {line}: bytes {found!r} are not valid {encoding} text (byte {column} of the line); "
            'set read.encoding to the file\'s encoding (e.g. "latin-1" or "cp1252")'
        )
    return None


def _longest_record(chunk: Chunk) -> tuple[int, int]:
    """(file line where the chunk's longest record starts, its bytes), by the quote count."""
    buf = np.frombuffer(chunk.data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    quotes = np.flatnonzero(buf == QUOTE[0])
    ends_record = (np.searchsorted(quotes, newlines) & 1) == 0
    ends = np.concatenate((newlines[ends_record] + 1, [len(buf)]))
    starts = np.concatenate(([0], ends[:-1]))
    longest = int(np.argmax(ends - starts))
    line = chunk.row_start + (int(np.flatnonzero(ends_record)[longest - 1]) + 1 if longest else 0)
    return line, int(ends[longest] - starts[longest])


def _record_lines(chunk: Chunk, records: int) -> np.ndarray:
    """File line where each record of the chunk starts, found by the quote count that cut
    the chunk (vectorised: ~20 ms per 100k rows); checks pyarrow found as many records."""
    buf = np.frombuffer(chunk.data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    ends_record = (_quotes_before(buf, newlines) & 1) == 0  # an even count of quotes before it
    ends = newlines[ends_record]
    starts = np.concatenate(([0], ends + 1))
    lines: np.ndarray = chunk.row_start + np.concatenate(([0], np.flatnonzero(ends_record) + 1))
    length = np.concatenate((ends, [len(buf)])) - starts
    first = buf[np.minimum(starts, max(len(buf) - 1, 0))] if len(buf) else np.zeros(len(starts), np.uint8)
    blank = (length == 0) | ((length == 1) & (first == ord("\r")))  # pyarrow skips empty lines
    lines = lines[~blank]
    if len(lines) != records:
        raise DataError(
            f"cannot find where the chunk's records start (pyarrow read {records}, the quote count "
            f"finds {len(lines)}): quote characters inside unquoted fields hide where records end; "
            'set read.parse = "reader" for this file',
            item=chunk.label,
        )
    return lines


def _quotes_before(buf: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """How many quote characters ``buf`` holds before each of the (sorted) ``positions``,
    counted on a bitmap of the quotes, 64 bytes to a word: the word's count before it
    (a running sum of popcounts) plus the popcount of its bits below the position. About
    half the cost of finding every quote's position and searching them (10 MB, 1M quotes:
    8 ms -> 4 ms)."""
    bits = np.packbits(buf == QUOTE[0], bitorder="little")
    words = np.concatenate((bits, np.zeros(-len(bits) % 8 + 8, np.uint8))).view(np.uint64)
    counts = np.bitwise_count(words).astype(np.int64)
    before = np.cumsum(counts) - counts  # quotes in the words before each word
    word = positions >> 6
    below = (np.uint64(1) << (positions & 63).astype(np.uint64)) - np.uint64(1)
    result: np.ndarray = before[word] + np.bitwise_count(words[word] & below)
    return result


def _malformed(starts: np.ndarray, bad: list[tuple[int, str, str]]) -> pd.DataFrame:
    string = pd.ArrowDtype(pa.string())
    return pd.DataFrame(
        {
            "_row": pd.array([int(starts[n - 1]) for n, _, _ in bad], dtype=pd.ArrowDtype(pa.int64())),
            "_step": pd.array([REJECT_STEP] * len(bad), dtype=string),
            "_reason": pd.array([reason for _, reason, _ in bad], dtype=string),
            "_raw": pd.array([json.dumps(text, ensure_ascii=False) for _, _, text in bad], dtype=string),
        }
    )


def _locate(chunk: Chunk, cfg: ReadConfig, error: Exception) -> str:
    """Name the first record whose field count differs from the header's (error path only)."""
    width = len(chunk.columns)
    try:
        reader = csv.reader(_text(chunk, cfg), delimiter=cfg.delimiter)
        while True:
            before = reader.line_num
            record = next(reader, None)
            if record is None:
                break
            if record and len(record) != width:
                return (
                    f"line {chunk.row_start + before}: expected {width} fields as in the header, "
                    f"got {len(record)}: {cfg.delimiter.join(record)[:80]!r} (pyarrow: {error})"
                )
    except csv.Error:
        pass
    return f"{error} (in {chunk.unit}s {chunk.row_start}-{chunk.row_start + chunk.rows - 1})"


def _text(chunk: Chunk, cfg: ReadConfig) -> io.StringIO:
    return io.StringIO(chunk.data.decode(cfg.encoding, errors="replace"), newline="")


def _split_csv(chunk: Chunk) -> tuple[Chunk, Chunk] | None:
    """Two chunks of whole records holding the chunk's text (for OOM retries); None when
    the chunk is one record."""
    end = record_end(chunk.data, len(chunk.data) // 2)
    if end <= 0 or end >= len(chunk.data):
        return None
    first, second = chunk.data[:end], chunk.data[end:]
    lines = first.count(b"\n")
    return (
        Chunk(
            chunk.source_index,
            chunk.source_name,
            chunk.index,
            chunk.row_start,
            lines,
            first,
            kind="csv",
            columns=chunk.columns,
        ),
        Chunk(
            chunk.source_index,
            chunk.source_name,
            chunk.index,
            chunk.row_start + lines,
            chunk.rows - lines,
            second,
            kind="csv",
            columns=chunk.columns,
        ),
    )


def _head_csv(chunk: Chunk, lines: int) -> Chunk:
    pos = 0
    for _ in range(min(lines, chunk.rows)):
        pos = chunk.data.find(b"\n", pos) + 1
        if pos == 0:
            return chunk
    end = record_end(chunk.data, pos) or len(chunk.data)
    data = chunk.data[:end]
    return Chunk(
        chunk.source_index,
        chunk.source_name,
        chunk.index,
        chunk.row_start,
        data.count(b"\n"),
        data,
        kind="csv",
        columns=chunk.columns,
    )


# ------------------------------------------------------------------- either kind


def decode_chunk(
    chunk: Chunk, read: ReadConfig, on_error: str, types: Mapping[str, pa.DataType] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The chunk as a DataFrame indexed by row (or file line) number, and the rows that
    could not be parsed (raw CSV only, ``on_error`` other than ``fail``); ``types``: CSV
    columns to parse straight to a type (``parse_csv_chunk``)."""
    if chunk.set_aside:
        return _set_aside(chunk, on_error)
    if chunk.kind == "csv":
        return parse_csv_chunk(chunk, read, on_error, types)
    df = decode_ipc(chunk.data).to_pandas(types_mapper=pd.ArrowDtype)
    df.index = pd.RangeIndex(chunk.row_start, chunk.row_start + len(df))
    return df, None


def _set_aside(chunk: Chunk, on_error: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A chunk of records the reader set aside for their length (``Chunk.set_aside``): no
    rows, every record rejected (step ``read``, its first bytes as the raw text); under
    ``fail`` (the reader fails first; this is the worker's guard) the first one fails."""
    line, reason, _ = chunk.set_aside[0]
    if on_error == "fail":
        raise DataError(
            f"the record starting at line {line}: {reason}; raise read.max_record_bytes if records this long are real",
            item=f"{chunk.source_name}[line {line}]",
        )
    if chunk.kind == "arrow":  # an empty table with the file's columns and types
        df = decode_ipc(chunk.data).to_pandas(types_mapper=pd.ArrowDtype)
    else:
        string = pd.ArrowDtype(pa.string())
        df = pd.DataFrame({c: pd.array([], dtype=string) for c in chunk.columns})
    starts = np.array([n for n, _, _ in chunk.set_aside], dtype=np.int64)
    return df, _malformed(starts, [(i + 1, why, text) for i, (_, why, text) in enumerate(chunk.set_aside)])


def split_chunk(chunk: Chunk) -> tuple[Chunk, Chunk] | None:
    """Two chunks holding the first and second half of ``chunk``'s rows (same index);
    None when it cannot be split (one CSV record)."""
    if chunk.kind == "csv":
        return _split_csv(chunk)

    table = decode_ipc(chunk.data)
    mid = table.num_rows // 2
    return (
        Chunk(
            chunk.source_index, chunk.source_name, chunk.index, chunk.row_start, mid, encode_ipc(table.slice(0, mid))
        ),
        Chunk(
            chunk.source_index,
            chunk.source_name,
            chunk.index,
            chunk.row_start + mid,
            table.num_rows - mid,
            encode_ipc(table.slice(mid)),
        ),
    )


def head(chunk: Chunk, rows: int) -> Chunk:
    """The chunk's first records: about ``rows`` lines of a CSV chunk, ``rows`` rows of an
    Arrow one (the planner's warm-up chunk)."""
    if chunk.kind == "csv":
        return _head_csv(chunk, rows)
    table = decode_ipc(chunk.data).slice(0, rows)
    return Chunk(chunk.source_index, chunk.source_name, chunk.index, chunk.row_start, table.num_rows, encode_ipc(table))

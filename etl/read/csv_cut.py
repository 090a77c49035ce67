"""CSV parsed in the workers: readers cut the text at record boundaries, workers parse it.

Reading (``split_csv``, in the parent's reader threads, ``read.parse = "worker"``)
    In: a decompressed byte stream of one staged CSV file and the ``ReadConfig``.
    Out: ``Chunk(kind="csv")`` records of about ``read.chunk_rows`` lines each: whole
    records of raw text, without the header (its column names travel in
    ``Chunk.columns``). The reader only decompresses (ISA-L for gzip) and scans bytes for
    newlines and quotes (numpy counts, the GIL released; ``bytes.count`` holds it and is
    several times slower on quote-heavy text); the parse runs in the worker
    that transforms the chunk, so N cores parse in N processes instead of one parent.

Where a record ends. A newline ends a record unless it is inside a quoted field. Quotes
open and close quoted fields and a doubled quote inside one stands for itself, so a
newline is inside a quoted field exactly when an odd number of quote characters precede
it since the last record boundary (RFC 4180). A quote inside an unquoted field (``12"
pipe``) breaks that count: files with those need ``read.parse = "reader"``. The worker
checks every chunk: pyarrow must find the records the quote count finds.

Chunk size. ``chunk_rows`` lines times the mean line length of the file's first
``SAMPLE_BYTES``: the cuts depend only on the file and the setting, so every executor
(and every rerun) sees the same chunks and writes the same part files.

Parsing (``parse_csv_chunk``, in the worker): pyarrow's CSV reader with the options the
reader-side path uses (``csv_options``: every column a string, ``read.null_values`` null
unless quoted), single-threaded (the pool is the parallelism). Rows are indexed by the
file line where each record starts. Rows with the wrong number of fields fail the chunk
naming the line, or with ``transform.on_error = "skip" | "quarantine"`` are rejected
like a bad value (step ``read``, the raw line kept).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from etl.core.config import ReadConfig
from etl.core.errors import ConfigError, DataError
from etl.core.records import Chunk, StagedFile

SAMPLE_BYTES = 1 << 20  # text whose mean line length sizes the chunks: more is steadier, slower to start
MIN_READ_BYTES = 1 << 16  # smallest read from the decompressor: smaller means more Python calls per chunk
MAX_RECORD_BYTES = 64 << 20  # no record end this far past the target: an unclosed quote, not a long record
COUNT_BLOCK_BYTES = 1 << 18  # bytes compared per numpy call: fits in L2 so the mask stays in cache
QUOTE = b'"'
REJECT_STEP = "read"  # the dead-letter ``step`` of rows with the wrong number of fields


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


def splittable(cfg: ReadConfig) -> bool:
    """Whether bytes can be cut at newlines and counted for quotes without decoding:
    true for UTF-8, Latin-1 and the like, false for UTF-16 and UTF-32."""
    return cfg.parse == "worker" and '\n"'.encode(text_encoding(cfg.encoding)) == b'\n"'


# --------------------------------------------------------------------- reader side


def count_byte(buf: bytes, byte: bytes, start: int = 0, end: int | None = None) -> int:
    """How many times ``byte`` occurs in ``buf[start:end]``, counted by numpy in blocks."""
    view = np.frombuffer(buf, dtype=np.uint8)
    end = len(buf) if end is None else end
    code = byte[0]
    return sum(int(np.count_nonzero(view[i : min(i + COUNT_BLOCK_BYTES, end)] == code))
               for i in range(start, end, COUNT_BLOCK_BYTES))  # fmt: skip


def record_end(buf: bytes, target: int) -> int:
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


def split_csv(stream: BinaryIO, staged: StagedFile, cfg: ReadConfig) -> Iterator[Chunk]:
    """Cut the stream into ``Chunk(kind="csv")`` records (see the module docstring)."""
    src = staged.source
    reader = _Cutter(stream, staged)
    header = reader.header(cfg)
    if header is None:
        return  # empty, blank, or a header and nothing else
    columns = header
    target = reader.target_bytes(cfg.chunk_rows)
    index = 0
    while True:
        line = reader.line  # where the next chunk starts
        if (data := reader.next_chunk(target)) is None:
            return
        lines = reader.line - line + (not data.endswith(b"\n"))
        yield Chunk(src.index, src.name, index, line, lines, data, kind="csv", columns=columns)
        index += 1


class _Cutter:
    """Buffered text of one stream, handed out in whole records."""

    def __init__(self, stream: BinaryIO, staged: StagedFile) -> None:
        self.stream, self.staged = stream, staged
        self.pending = b""
        self.eof = False
        self.line = 1  # file line where ``pending`` starts

    def _fill(self, size: int) -> None:
        """Read until ``pending`` holds ``size`` bytes or the stream ends."""
        while not self.eof and len(self.pending) < size:
            more = self.stream.read(max(size - len(self.pending), MIN_READ_BYTES))
            if more:
                self.pending += more
            else:
                self.eof = True

    def _take(self, end: int) -> bytes:
        data, self.pending = self.pending[:end], self.pending[end:]
        self.line += count_byte(data, b"\n")
        return data

    def header(self, cfg: ReadConfig) -> tuple[str, ...] | None:
        """The header's column names (blank lines before it skipped); None without data rows."""
        self._fill(SAMPLE_BYTES)
        while self.pending[:1] in (b"\n", b"\r") and self.pending:
            self._take(2 if self.pending.startswith(b"\r\n") else 1)
        if not self.pending.strip():
            return None
        if b"\n" not in self.pending and b"\r" in self.pending:
            raise DataError(
                f"{self.staged.source.url}: lines end in a bare carriage return (\\r); they can only "
                'be read with read.parse = "reader"', item=self.staged.source.name,
            )  # fmt: skip
        text = self.next_chunk(1)
        assert text is not None
        read, parse, convert = csv_options(cfg)
        try:
            names = pacsv.read_csv(pa.py_buffer(text), read_options=read, parse_options=parse,
                                   convert_options=convert).column_names  # fmt: skip
        except (pa.ArrowException, UnicodeError) as e:
            raise DataError(f"cannot read the CSV header of {self.staged.source.url}: {e}",
                            item=self.staged.source.name) from e  # fmt: skip
        self._fill(SAMPLE_BYTES)
        return tuple(names) if self.pending.strip() else None

    def target_bytes(self, rows: int) -> int:
        sample = self.pending[:SAMPLE_BYTES]
        per_line = len(sample) / max(sample.count(b"\n"), 1)
        return max(int(rows * per_line), 1)

    def next_chunk(self, target: int) -> bytes | None:
        """The next whole records, about ``target`` bytes; None at the end of the stream."""
        while True:
            self._fill(target)
            if self.eof and len(self.pending) <= target:
                data = self._take(len(self.pending))
                return data if data.strip() else None
            end = record_end(self.pending, target)
            if end:
                return self._take(end)
            if len(self.pending) > target + MAX_RECORD_BYTES:
                raise DataError(
                    f"{self.staged.source.url}: no end of record in {len(self.pending) >> 20} MiB after "
                    f"line {self.line}: a quoted field never closes, or quote characters appear inside "
                    'unquoted fields (then set read.parse = "reader")', item=self.staged.source.name,
                )  # fmt: skip
            target = len(self.pending) + MIN_READ_BYTES  # one record longer than the target: read on


# --------------------------------------------------------------------- worker side


def parse_csv_chunk(chunk: Chunk, cfg: ReadConfig, on_error: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The chunk's rows as a DataFrame indexed by file line, and its malformed rows as
    rejects (``on_error`` other than ``fail``; ``etl.transform.steps`` rejects have the same columns)."""
    read, parse, convert = csv_options(cfg, columns=chunk.columns)
    bad: list[tuple[int, str, str]] = []  # (record number within the chunk, reason, raw text)
    if on_error != "fail":
        def skip(row: pacsv.InvalidRow) -> str:
            reason = f"expected {row.expected_columns} fields as in the header, got {row.actual_columns}"
            bad.append((row.number or 0, reason, row.text))
            return "skip"

        parse.invalid_row_handler = skip
    try:
        table = pacsv.read_csv(pa.py_buffer(chunk.data), read_options=read, parse_options=parse,
                               convert_options=convert)  # fmt: skip
    except (pa.ArrowException, UnicodeError) as e:
        hint = ('; if the file has quote characters inside unquoted fields, set read.parse = "reader"'
                if QUOTE in chunk.data else "")  # fmt: skip
        raise DataError(f"cannot parse CSV: {_locate(chunk, cfg, e)}{hint}", item=chunk.label) from e
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    if not bad and table.num_rows == chunk.rows:
        df.index = pd.RangeIndex(chunk.row_start, chunk.row_start + chunk.rows)  # one record per line
        return df, None
    starts = _record_lines(chunk, table.num_rows + len(bad))
    skipped = np.zeros(len(starts), dtype=bool)
    skipped[[n - 1 for n, _, _ in bad]] = True
    df.index = pd.Index(starts[~skipped])
    return df, _malformed(starts, bad) if bad else None


def _record_lines(chunk: Chunk, records: int) -> np.ndarray:
    """File line where each record of the chunk starts, found by the quote count that cut
    the chunk (vectorised: ~20 ms per 100k rows); checks pyarrow found as many records."""
    buf = np.frombuffer(chunk.data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    quotes = np.flatnonzero(buf == QUOTE[0])
    ends_record = (np.searchsorted(quotes, newlines) & 1) == 0  # an even count of quotes before it
    ends = newlines[ends_record]
    starts = np.concatenate(([0], ends + 1))
    lines = chunk.row_start + np.concatenate(([0], np.flatnonzero(ends_record) + 1))
    length = np.concatenate((ends, [len(buf)])) - starts
    first = buf[np.minimum(starts, max(len(buf) - 1, 0))] if len(buf) else np.zeros(len(starts), np.uint8)
    blank = (length == 0) | ((length == 1) & (first == ord("\r")))  # pyarrow skips empty lines
    lines = lines[~blank]
    if len(lines) != records:
        raise DataError(
            f"cannot find where the chunk's records start (pyarrow read {records}, the quote count "
            f"finds {len(lines)}): quote characters inside unquoted fields hide where records end; "
            'set read.parse = "reader" for this file', item=chunk.label,
        )  # fmt: skip
    return lines


def _malformed(starts: np.ndarray, bad: list[tuple[int, str, str]]) -> pd.DataFrame:
    string = pd.ArrowDtype(pa.string())
    return pd.DataFrame({
        "_row": pd.array([int(starts[n - 1]) for n, _, _ in bad], dtype=pd.ArrowDtype(pa.int64())),
        "_step": pd.array([REJECT_STEP] * len(bad), dtype=string),
        "_reason": pd.array([reason for _, reason, _ in bad], dtype=string),
        "_raw": pd.array([json.dumps(text, ensure_ascii=False) for _, _, text in bad], dtype=string),
    })  # fmt: skip


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


def split_in_half(chunk: Chunk) -> tuple[Chunk, Chunk] | None:
    """Two chunks of whole records holding the chunk's text (for OOM retries); None when
    the chunk is one record."""
    end = record_end(chunk.data, len(chunk.data) // 2)
    if end <= 0 or end >= len(chunk.data):
        return None
    first, second = chunk.data[:end], chunk.data[end:]
    lines = first.count(b"\n")
    return (
        Chunk(chunk.source_index, chunk.source_name, chunk.index, chunk.row_start, lines, first,
              kind="csv", columns=chunk.columns),
        Chunk(chunk.source_index, chunk.source_name, chunk.index, chunk.row_start + lines,
              chunk.rows - lines, second, kind="csv", columns=chunk.columns),
    )  # fmt: skip


def head(chunk: Chunk, lines: int) -> Chunk:
    """The chunk's first records, about ``lines`` lines (the probe's warm-up chunk)."""
    pos = 0
    for _ in range(min(lines, chunk.rows)):
        pos = chunk.data.find(b"\n", pos) + 1
        if pos == 0:
            return chunk
    end = record_end(chunk.data, pos) or len(chunk.data)
    data = chunk.data[:end]
    return Chunk(chunk.source_index, chunk.source_name, chunk.index, chunk.row_start,
                 data.count(b"\n"), data, kind="csv", columns=chunk.columns)  # fmt: skip

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

Chunk size, in bytes. ``chunk_rows`` lines times the mean line length of the file's
first ``SAMPLE_BYTES``, at most ``MAX_CHUNK_BYTES``: wide rows (or a first row holding a
2 MiB field, which makes the sample one line long) cannot ask for gigabytes. The cuts
depend only on the file and the settings, so every executor (and every rerun) sees the
same chunks and writes the same part files.

Long records. A record of any length up to ``read.max_record_bytes`` is cut whole,
wherever it sits (the first row too): the buffer grows by doubling while no record end is
in it, and decompression is only asked for what the buffer needs, so a gzip bomb is read
no further than ``max_record_bytes`` past the last record end. A longer record (or a
quoted field that never closes) fails the file naming the line where it starts; with
``set_aside`` (``transform.on_error = "skip" | "quarantine"``) it is read past in
``SKIP_READ_BYTES`` reads, keeping only its first ``SET_ASIDE_PREFIX_BYTES``, and handed on
as a chunk of its own with no text (``Chunk.set_aside``: its line, the reason, that
prefix), which the worker rejects like a row with the wrong field count; the rest of the
file is read on.

Parsing (``parse_csv_chunk``, in the worker): pyarrow's CSV reader with the options the
reader-side path uses (``csv_options``: every column a string, ``read.null_values`` null
unless quoted), single-threaded (the pool is the parallelism). Rows are indexed by the
file line where each record starts. Rows with the wrong number of fields fail the chunk
naming the line, or with ``transform.on_error = "skip" | "quarantine"`` are rejected
like a bad value (step ``read``, the raw line kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from etl.core.chunks import QUOTE, count_byte, csv_options, record_end, text_encoding, undecodable
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import SET_ASIDE_PREFIX_BYTES, Chunk, StagedFile

SAMPLE_BYTES = 1 << 20  # text whose mean line length sizes the chunks: more is steadier, slower to start
MIN_READ_BYTES = 1 << 16  # smallest read from the decompressor: smaller means more Python calls per chunk
SKIP_READ_BYTES = 1 << 20  # read size while skipping a record set aside: bigger is fewer calls, more held at once
MAX_CHUNK_BYTES = 32 << 20  # text per chunk at most: a worker holds several times its chunk while parsing;
# bigger chunks only save per-chunk overhead, which is negligible past a few MiB


def splittable(cfg: ReadConfig) -> bool:
    """Whether bytes can be cut at newlines and counted for quotes without decoding:
    true for UTF-8, Latin-1 and the like, false for UTF-16 and UTF-32."""
    return cfg.parse == "worker" and '\n"'.encode(text_encoding(cfg.encoding)) == b'\n"'


def split_csv(stream: BinaryIO, staged: StagedFile, cfg: ReadConfig, *, set_aside: bool = False) -> Iterator[Chunk]:
    """Cut the stream into ``Chunk(kind="csv")`` records (see the module docstring);
    ``set_aside``: a record longer than ``read.max_record_bytes`` becomes a chunk of its own
    holding only its line and first bytes (``Chunk.set_aside``), instead of failing the file."""
    src = staged.source
    reader = _Cutter(stream, staged, cfg.max_record_bytes, set_aside)
    header = reader.header(cfg)
    if header is None:
        return  # empty, blank, or a header and nothing else
    columns = header
    target = reader.target_bytes(cfg.chunk_rows)
    index = 0
    while True:
        line = reader.line  # where the next chunk starts
        try:
            data = reader.next_chunk(target)
        except _TooLong as long:
            yield Chunk(
                src.index, src.name, index, line, long.lines, b"", kind="csv", columns=columns, set_aside=(long.record,)
            )
            index += 1
            continue
        if data is None:
            return
        lines = reader.line - line + (not data.endswith(b"\n"))
        yield Chunk(src.index, src.name, index, line, lines, data, kind="csv", columns=columns)
        index += 1


class _TooLong(Exception):
    """A record longer than ``read.max_record_bytes`` was skipped (``set_aside``)."""

    def __init__(self, record: tuple[int, str, str], lines: int) -> None:
        self.record, self.lines = record, lines


class _Cutter:
    """Buffered text of one stream, handed out in whole records."""

    def __init__(self, stream: BinaryIO, staged: StagedFile, max_record: int, set_aside: bool = False) -> None:
        self.stream, self.staged, self.max_record, self.set_aside = stream, staged, max_record, set_aside
        self.encoding = "utf-8"  # the file's, once ``header`` has read the config
        self.pending = bytearray()  # grows in place (a long record is not copied at each read)
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
        with memoryview(self.pending) as view:
            data = bytes(view[:end])  # the chunk's one copy
        del self.pending[:end]  # bytearray: drops its head without copying the rest
        self.line += count_byte(data, b"\n")
        return data

    def header(self, cfg: ReadConfig) -> tuple[str, ...] | None:
        """The header's column names (blank lines before it skipped); None without data rows."""
        self._fill(SAMPLE_BYTES)
        while bytes(self.pending[:1]) in (b"\n", b"\r") and self.pending:
            self._take(2 if self.pending.startswith(b"\r\n") else 1)
        if not self.pending.strip():
            return None
        if b"\n" not in self.pending and b"\r" in self.pending:
            raise DataError(
                f"{self.staged.source.url}: lines end in a bare carriage return (\\r); they can only "
                'be read with read.parse = "reader"',
                item=self.staged.source.name,
            )
        self.encoding = text_encoding(cfg.encoding)
        keep, self.set_aside = self.set_aside, False  # a header too long fails the file, whatever on_error says
        try:
            text = self.next_chunk(1)
        finally:
            self.set_aside = keep
        assert text is not None
        read, parse, convert = csv_options(cfg)
        try:
            names = pacsv.read_csv(
                pa.py_buffer(text), read_options=read, parse_options=parse, convert_options=convert
            ).column_names
        except (pa.ArrowException, UnicodeError) as e:
            detail = undecodable(text, cfg.encoding, 1) or str(e)
            raise DataError(
                f"cannot read the CSV header of {self.staged.source.url}: {detail}", item=self.staged.source.name
            ) from e
        self._fill(SAMPLE_BYTES)
        return tuple(names) if self.pending.strip() else None

    def target_bytes(self, rows: int) -> int:
        sample = self.pending[:SAMPLE_BYTES]
        per_line = len(sample) / max(sample.count(b"\n"), 1)
        return max(min(int(rows * per_line), MAX_CHUNK_BYTES), 1)

    def next_chunk(self, target: int) -> bytes | None:
        """The next whole records, about ``target`` bytes; None at the end of the stream.
        With ``set_aside`` no chunk holds a record longer than ``max_record``: the target is
        capped at it, so only a chunk's first record can be longer, and that one is skipped."""
        if self.set_aside:
            target = min(target, self.max_record)
        while True:
            self._fill(target)
            if self.eof and len(self.pending) <= target:
                data = self._take(len(self.pending))
                return data if data.strip() else None
            end = record_end(self.pending, target)
            if end and self.set_aside and end > self.max_record:
                raise self._skip_record()  # the first record end is past the limit
            if end:
                return self._take(end)
            # No record end in the buffer: its first record is longer than the buffer.
            if len(self.pending) > self.max_record:
                if self.set_aside:
                    raise self._skip_record()
                raise self._too_long()
            target = min(max(2 * len(self.pending), len(self.pending) + MIN_READ_BYTES), self.max_record + 1)

    def _skip_record(self) -> _TooLong:
        """Read past the record at the head of ``pending`` (longer than ``max_record``),
        keeping only its first ``SET_ASIDE_PREFIX_BYTES``: memory stays at one read."""
        start, prefix = self.line, self.pending[:SET_ASIDE_PREFIX_BYTES]
        skipped = newlines = odd = 0
        block: bytes | bytearray = self.pending
        self.pending = bytearray()
        while True:
            if not block:
                self.eof, end = True, None
                break
            end = _first_record_end(block, odd)
            if end is not None:
                newlines += count_byte(block, b"\n", 0, end)
                skipped += end
                self.pending = bytearray(block[end:])
                break
            odd ^= count_byte(block, QUOTE) % 2
            newlines += count_byte(block, b"\n")
            skipped += len(block)
            block = self.stream.read(SKIP_READ_BYTES)
        self.line += newlines
        tail = "" if end is not None else "; no record end before the end of the file (a quoted field never closes?)"
        reason = (
            f"record longer than read.max_record_bytes ({_size(self.max_record)}): {_size(skipped)}, "
            f"lines {start}-{start + max(newlines - (end is not None), 0)}{tail}"
        )
        text = prefix.decode(self.encoding, errors="replace")
        return _TooLong((start, reason, text), max(newlines, 1))

    def _too_long(self) -> DataError:
        src = self.staged.source
        return DataError(
            f"{src.url}: the record starting at line {self.line} is longer than read.max_record_bytes "
            f"({_size(self.max_record)}; no record end in the {_size(len(self.pending))} read from there): "
            "raise read.max_record_bytes if records this long are real; otherwise a quoted field never "
            'closes, or quote characters appear inside unquoted fields (then set read.parse = "reader")',
            item=f"{src.name}[line {self.line}]",
        )


def _first_record_end(block: bytes | bytearray, odd: int) -> int | None:
    """Index just past the first newline of ``block`` outside a quoted field, given the
    parity of the quotes before the block; None when there is none."""
    buf = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    if not len(newlines):
        return None
    quotes = np.flatnonzero(buf == QUOTE[0])
    even = ((np.searchsorted(quotes, newlines) + odd) & 1) == 0
    found = np.flatnonzero(even)
    return int(newlines[found[0]]) + 1 if len(found) else None


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"

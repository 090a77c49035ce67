"""Lines longer than ``read.max_record_bytes`` taken out of a stream before pyarrow parses it.

JSON Lines files, and CSV files read by pyarrow in the reader threads (``read.parse =
"reader"``), are parsed by pyarrow's streaming readers, which hold a whole record in one
block: a record longer than the limit would fail the file. ``LongLines`` wraps the
decompressed stream and hands on whole lines; a line longer than ``max_record_bytes``
(without its newline) is read past in ``SKIP_READ_BYTES`` reads, keeping only its first
``SET_ASIDE_PREFIX_BYTES``, and noted in an ``Aside`` (its file line, the reason, that
prefix) for the reader to hand on as a chunk of its own (``Chunk.set_aside``); the rest of
the file is read on. Memory stays at about ``max_record_bytes`` plus one read. The filter
costs a copy of every byte, so it runs only with ``transform.on_error = "skip" |
"quarantine"``; under ``fail`` pyarrow finds the long record (a block it straddles, or
``_check_record_sizes``) and the file is read through ``LongLines`` once more, without
``set_aside``, to fail naming the line (``etl.read.formats``).

Limits: a record is a line here. That is exact for JSON Lines (a JSON string cannot hold a
raw newline); for CSV a quoted field spanning lines, each shorter than the limit, is still
caught by pyarrow (which fails the file), and a line set aside from inside a quoted field
leaves the rest of that record for pyarrow. The header line (CSV) always fails when too
long. Only for encodings where a newline is the byte ``\\n`` (UTF-8, Latin-1, ...).
"""

from __future__ import annotations

import io
from collections import deque
from typing import BinaryIO

import numpy as np

from etl.core.errors import DataError
from etl.core.records import SET_ASIDE_PREFIX_BYTES, StagedFile

READ_BYTES = 1 << 20  # bytes asked of the decompressor at a time: bigger is fewer Python calls, more held
SKIP_READ_BYTES = 1 << 20  # read size while skipping a long line: bigger is fewer calls, more held at once

Record = tuple[int, str, str]  # (file line, reason, first bytes as text)


class Aside:
    """Lines set aside for their length, in file order; a second pass over the same file
    (pyarrow's retry with bigger blocks) does not note them twice."""

    def __init__(self, set_aside: bool, header: bool) -> None:
        self.set_aside = set_aside
        """False: a long line fails the file."""
        self.header = header
        """Line 1 is a header (CSV): too long, it fails the file whatever ``set_aside`` says."""
        self.found: list[Record] = []
        self._lines: set[int] = set()
        self._taken = 0

    def note(self, record: Record) -> None:
        if record[0] not in self._lines:
            self._lines.add(record[0])
            self.found.append(record)

    def take(self) -> list[Record]:
        """The lines noted since the last call."""
        new = self.found[self._taken :]
        self._taken = len(self.found)
        return new


class LongLines(io.RawIOBase):
    """The stream's bytes without the lines longer than ``max_record`` (noted in ``aside``).
    Lines are handed on as views of the decompressor's blocks: one copy, in ``read``."""

    def __init__(
        self, stream: BinaryIO, staged: StagedFile, max_record: int, aside: Aside, encoding: str = "utf-8"
    ) -> None:
        super().__init__()
        self._stream, self._staged, self._max, self._aside = stream, staged, max_record, aside
        self._encoding = encoding
        self._out: deque[memoryview] = deque()  # whole lines ready to hand out
        self._ready = 0  # bytes in ``_out``
        self._tail = bytearray()  # the line being read (no newline yet)
        self._line = 1  # file line where ``_tail`` starts
        self._eof = False
        self._pos = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        want = None if size is None or size < 0 else size
        while not self._eof and (want is None or self._ready < want):
            self._more()
        n = self._ready if want is None else min(want, self._ready)
        if self._out and len(self._out[0]) >= n:  # most reads: part of one block
            head = self._out[0]
            data = bytes(head[:n])
            if len(head) == n:
                self._out.popleft()
            else:
                self._out[0] = head[n:]
        else:
            pieces, got = [], 0
            while got < n:
                head = self._out.popleft()
                if got + len(head) > n:
                    self._out.appendleft(head[n - got :])
                    head = head[: n - got]
                pieces.append(head)
                got += len(head)
            data = b"".join(pieces)
        self._ready -= n
        self._pos += n
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]  # RawIOBase's takes any buffer
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()

    def _more(self) -> None:
        block: bytes | None = self._stream.read(READ_BYTES)
        if not block:
            self._eof = True
            if len(self._tail) > self._max:
                self._skip()
            elif self._tail:
                self._push(memoryview(bytes(self._tail)), 0)
                self._tail = bytearray()
            return
        while block:
            block = self._feed(block)

    def _feed(self, block: bytes) -> bytes | None:
        """Take in ``block``; what is left of it to take in after a long line was skipped."""
        view, start = memoryview(block), 0
        if self._tail:
            i = block.find(b"\n")
            if i < 0:
                self._tail += block
                return self._skip() if len(self._tail) > self._max else None
            self._tail += view[: i + 1]
            line, self._tail = bytes(self._tail), bytearray()
            self._release(memoryview(line), 1)
            start = i + 1
        cut = block.rfind(b"\n", start) + 1
        if cut > start:
            self._release(view[start:cut], block.count(b"\n", start, cut))
            start = cut
        self._tail = bytearray(view[start:])
        return self._skip() if len(self._tail) > self._max else None

    def _push(self, view: memoryview, newlines: int) -> None:
        if len(view):
            self._out.append(view)
            self._ready += len(view)
        self._line += newlines

    def _release(self, region: memoryview, newlines: int) -> None:
        """Hand on the whole lines of ``region`` but those longer than the limit."""
        if len(region) <= self._max + 1:  # no line in it can be too long
            self._push(region, newlines)
            return
        ends = np.flatnonzero(np.frombuffer(region, dtype=np.uint8) == ord("\n")) + 1
        starts = np.concatenate(([0], ends[:-1]))
        kept = 0
        for k in np.flatnonzero(ends - starts - 1 > self._max):
            start, end = int(starts[k]), int(ends[k])
            self._push(region[kept:start], int(k) - int(np.searchsorted(ends, kept, side="right")))
            self._note(self._line, end - start - 1, bytes(region[start : start + SET_ASIDE_PREFIX_BYTES]), True)
            self._line += 1
            kept = end
        self._push(region[kept:], len(ends) - int(np.searchsorted(ends, kept, side="right")))

    def _skip(self) -> bytes | None:
        """Read past the line in ``_tail`` (longer than the limit) up to its newline,
        keeping only its first bytes; what follows that newline in the last read."""
        prefix = bytes(self._tail[:SET_ASIDE_PREFIX_BYTES])
        size = len(self._tail)
        self._tail = bytearray()
        self._fail_if_kept(self._line, size, prefix)
        rest: bytes | None = None
        while block := self._stream.read(SKIP_READ_BYTES):
            i = block.find(b"\n")
            if i >= 0:
                size += i
                rest = block[i + 1 :]
                break
            size += len(block)
        else:
            self._eof = True
        self._note(self._line, size, prefix, rest is not None)
        self._line += 1
        return rest

    def _fail_if_kept(self, line: int, size: int, prefix: bytes) -> None:
        if not self._aside.set_aside or (self._aside.header and line == 1):
            src = self._staged.source
            what = "the header" if self._aside.header and line == 1 else f"the record at line {line}"
            raise DataError(
                f"{src.url}: {what} is longer than read.max_record_bytes ({_size(self._max)}; "
                f"{_size(size)} read without a line end): raise read.max_record_bytes if records this long are real",
                item=f"{src.name}[line {line}]",
            )

    def _note(self, line: int, size: int, prefix: bytes, ended: bool) -> None:
        self._fail_if_kept(line, size, prefix)
        tail = "" if ended else "; no line end before the end of the file"
        reason = f"record longer than read.max_record_bytes ({_size(self._max)}): {_size(size)}, line {line}{tail}"
        self._aside.note((line, reason, prefix.decode(self._encoding, errors="replace")))


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"

"""A staged file's bytes as the readers see them: decompressed, and counted as stored.

``open_stream`` opens a staged file decompressed (the codec decided by file extension:
``.gz``/``.gzip`` through ISA-L, about 3.5x zlib's speed; ``.zst``/``.zstd`` and ``.bz2``
through pyarrow), optionally through ``etl.read.long_lines``'s filter of lines too long.
``Consumed`` counts how far into the file as stored a reader has got, which each chunk
carries as its ``source_bytes``. ``STREAM_ERRORS`` is what a broken stream raises; the
rest (``where``, ``file_size``, ``is_blank``) serve the error messages and the empty-file
checks of ``etl.read.formats`` and ``etl.read.readers``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, cast

import pyarrow as pa
from isal import igzip
from isal.igzip_lib import IsalError

from etl.core.chunks import text_encoding
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import StagedFile
from etl.read.long_lines import Aside, LongLines

# What a broken compressed stream raises: pyarrow's streams, ISA-L's gzip, Python's file objects.
# (isal's stubs declare IsalError as an instance, ``IsalError: Exception``; it is a class.)
STREAM_ERRORS: tuple[type[Exception], ...] = (
    pa.ArrowException,
    OSError,
    EOFError,
    cast("type[Exception]", IsalError),
)

# The codec of a compressed CSV / JSON Lines file, by its extension.
COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}


class Consumed:
    """How far into the file as stored a reader has got: each chunk's ``source_bytes``.

    Compressed files count compressed bytes: the position of the raw file under the
    decompressor. That is known at once, never goes back, and sums exactly to the size on
    disk, the total the progress bars get from staged sizes and Content-Length. The other
    choice, the decompressed share scaled, needs the decompressed size, which gzip records
    only at the end of the file and modulo 4 GiB (zstd and bz2 not at all). The position
    runs ahead of a chunk by the decompressor's read-ahead (a few hundred KiB), so a chunk
    may be counted a little early, never twice; the last chunk of a file is read when the
    raw file is at its end, so a file's chunks add up to its size. Parquet counts the share
    of its rows read (its footer is read first, so the position says nothing)."""

    def __init__(self, size: int, aside: Aside | None = None) -> None:
        self.size = size
        self.aside = aside
        """Where lines too long are noted (JSON Lines, reader-parsed CSV): see ``etl.read.long_lines``."""
        self.counted = 0
        self._raw: BinaryIO | None = None
        self._at: int | None = None

    def watch(self, raw: BinaryIO) -> None:
        """The raw file the decompressor reads (a second pass's replaces the first's)."""
        self._raw, self._at = raw, None

    def reach(self, position: int) -> None:
        """Set the position directly (Parquet: the share of rows read)."""
        self._at = position

    def take(self) -> int:
        """Bytes consumed since the last call."""
        if self._at is not None:
            position = self._at
        elif self._raw is None or self._raw.closed:
            position = self.size  # the stream is done with (or was never opened): all of it
        else:
            position = self._raw.tell()
        n = max(min(position, self.size) - self.counted, 0)
        self.counted += n
        return n


def where(staged: StagedFile) -> str:
    """The file as messages name it: its URL, and where it is staged when that differs."""
    src = staged.source
    return src.url if src.url == str(staged.path) else f"{src.url} (staged as {staged.path})"


def file_size(staged: StagedFile) -> int:
    """The staged file's size on disk; a ``DataError`` naming it when it cannot be opened."""
    try:
        return staged.path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot open staged file {staged.path}: {e.strerror}", item=staged.source.name) from e


def compression(staged: StagedFile) -> str | None:
    """The codec by file extension, the staged name's first, then the source's; None: plain."""
    for name in (staged.path.name, staged.source.name):
        codec = COMPRESSION_BY_SUFFIX.get(Path(name).suffix.lower())
        if codec:
            return codec
    return None


def open_stream(
    staged: StagedFile, consumed: Consumed | None = None, cfg: ReadConfig | None = None, aside: Aside | None = None
) -> BinaryIO:
    """The file's decompressed bytes; gzip through ISA-L (pyarrow's zlib is ~3.5x slower).
    ``consumed`` watches the raw file under the decompressor. With ``cfg`` and an ``aside``
    (``consumed``'s unless given), lines longer than ``read.max_record_bytes`` are taken out
    (``etl.read.long_lines``)."""
    codec = compression(staged)
    if codec is None:
        stream: BinaryIO = open(staged.path, "rb")
        raw = stream
    elif codec == "gzip":
        stream = cast(BinaryIO, igzip.open(staged.path, "rb"))  # type: ignore[no-untyped-call]  # isal's igzip.open has no annotations
        raw = cast(BinaryIO, stream.fileobj)  # type: ignore[attr-defined]  # GzipFile's raw file; not in the BinaryIO protocol
    else:
        raw = open(staged.path, "rb")
        stream = io.BufferedReader(pa.input_stream(raw, compression=codec))  # closes ``raw`` when closed
    if consumed is not None:
        consumed.watch(raw)
        aside = aside or consumed.aside
    if cfg is not None and aside is not None:
        encoding = text_encoding(cfg.encoding) if staged.source.format == "csv" else "utf-8"
        stream = cast(BinaryIO, LongLines(stream, staged, cfg.max_record_bytes, aside, encoding))
    return stream


def is_blank(staged: StagedFile) -> bool:
    """True when the decompressed file holds only whitespace (error path only)."""
    try:
        with open_stream(staged) as stream:
            while block := stream.read(1 << 20):
                if block.strip():
                    return False
    except STREAM_ERRORS:
        return False
    return True

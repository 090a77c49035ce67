"""Samples for the planner (``etl.run.resources``): what reading costs, and a chunk to measure.

``sample_chunk`` reads the first chunks of a file the way the read stage would and
reports the first chunk and how much this process grew while reading (a reader thread's
decompression and parse buffers). ``sample_from_head`` turns the first bytes of a remote
file (CSV or JSON Lines; plain, gzip or bz2) into a small local file of whole records.
"""

from __future__ import annotations

import bz2
import zlib
from pathlib import Path

import psutil

from etl.core.chunks import record_end
from etl.core.config import ReadConfig
from etl.core.records import Chunk, Source, StagedFile
from etl.read.formats import read_chunks
from etl.read.streams import COMPRESSION_BY_SUFFIX

MAX_SAMPLE_RATIO = 16  # text kept per compressed byte of the head: CSV gzips 5-10x; more is a bomb's padding
MIN_SAMPLE_TEXT = 1 << 20  # ... but at least this much text, so that a tiny head still gives whole records


def sample_chunk(src: Source, cfg: ReadConfig, rows: int, read_rows: int) -> tuple[Chunk | None, int]:
    """(the first chunk of ``rows`` rows, bytes this process grew while reading up to
    ``read_rows`` rows) of the local file ``src.url``."""
    path = Path(src.url)
    proc = psutil.Process()
    before = proc.memory_info().rss
    read = cfg.model_copy(update={"chunk_rows": min(cfg.chunk_rows, rows)})
    chunks = read_chunks(StagedFile(src, path, path.stat().st_size), read)
    first, seen, peak = None, 0, before
    try:
        for chunk in chunks:  # the first chunk is the sample; the next ones grow the reader to size
            first = first or chunk
            seen += chunk.rows
            peak = max(peak, proc.memory_info().rss)
            if seen >= read_rows:
                break
    finally:
        chunks.close()
    return first, peak - before


def can_sample_head(src: Source) -> bool:
    """Whether ``sample_from_head`` can read this source's first bytes."""
    codec = COMPRESSION_BY_SUFFIX.get(Path(src.name).suffix.lower())
    return src.is_remote and src.format in ("csv", "jsonl") and codec in (None, "gzip", "bz2")


def sample_from_head(raw: bytes, src: Source, folder: Path) -> Source:
    """The first bytes of ``src`` (as stored: compressed or not), decompressed and cut after
    the last whole record, written to ``folder``: a local source to measure. Raises
    ``zlib.error``/``OSError``/``ValueError`` for bytes that do not decompress."""
    name = Path(src.name)
    codec = COMPRESSION_BY_SUFFIX.get(name.suffix.lower())
    limit = max(len(raw) * MAX_SAMPLE_RATIO, MIN_SAMPLE_TEXT)  # a gzip bomb expands no further than this
    text = (
        zlib.decompressobj(wbits=47).decompress(raw, limit)
        if codec == "gzip"  # 47: gzip or zlib header
        else bz2.BZ2Decompressor().decompress(raw, limit)
        if codec == "bz2"
        else raw
    )
    end = record_end(text, len(text)) if src.format == "csv" else text.rfind(b"\n") + 1
    path = folder / (name.stem if codec else name.name)
    path.write_bytes(text[:end])
    return Source(src.index, str(path), f"{path.name} (first {len(raw) >> 10} KiB)", src.format)

"""Sources on object storage: ``s3://bucket/prefix/…`` and any other fsspec URL
(see ``etl.core.objstore`` for which URLs and where credentials come from).

A URL with ``*``/``?``/``[`` is a glob, one ending in ``/`` a prefix (every object under
it), anything else one object; matches come in sorted order and a pattern that matches
nothing is an error. The download stage streams each object to ``staging/<name>``
(``.part`` first, fsynced, renamed) and verifies its checksum, so the read stage sees a
finished local file as for HTTP sources.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from etl.core import durable
from etl.core.errors import ChecksumMismatch, ConfigError, SourceError
from etl.core.objstore import filesystem, store_errors, url_of
from etl.core.records import Source, StagedFile
from etl.download.checksums import (
    checksum_problem,
    hexdigests,
    new_hashers,
    write_and_hash,
)

log = logging.getLogger("etl.objectstore")

_GLOB_CHARS = re.compile(r"[*?\[]")


def expand(url: str, *, where: str, file: str) -> list[str]:
    """One ``sources`` entry → object URLs, sorted. ``ConfigError`` when nothing matches."""
    fs, path = filesystem(url, key=where, file=file)
    try:
        fs.invalidate_cache()  # a long-lived process must see objects written since
        if _GLOB_CHARS.search(path):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif url.endswith("/"):
            found = list(fs.find(path))
        else:
            found = [path] if fs.isfile(path) else []
    except store_errors() as e:
        raise SourceError(f"cannot list {url}: {type(e).__name__}: {e}", item=url) from e
    if not found:
        raise ConfigError(f"no object matches {url!r}", key=where, file=file)
    return [url_of(fs, p) for p in sorted(found)]


async def stage_object(
    src: Source, staging_dir: Path, block_bytes: int, *, sized: Callable[[int], None] | None = None
) -> StagedFile:
    """Stream one object to ``staging_dir/<name>`` (in a thread) and verify its checksum.
    ``sized`` is told the object's size (from that thread) once it is open, before its bytes."""
    return await asyncio.to_thread(_fetch, src, staging_dir, block_bytes, sized)


def _fetch(src: Source, staging_dir: Path, block_bytes: int, sized: Callable[[int], None] | None = None) -> StagedFile:
    fs, path = filesystem(src.url, key="sources")
    dest = staging_dir / src.name
    partial = dest.with_name(dest.name + ".part")
    hashers = new_hashers(src)
    size = 0
    try:
        with fs.open(path, "rb", block_size=block_bytes) as r:
            if sized is not None and isinstance(getattr(r, "size", None), int):
                sized(r.size)
            w = open(partial, "wb", opener=lambda p, flags: os.open(p, flags, durable.PRIVATE_MODE))
            try:
                while data := r.read(block_bytes):
                    write_and_hash(w, data, hashers)
                    size += len(data)
            finally:
                durable.close_synced(w)
    except FileNotFoundError:
        raise SourceError(f"object not found: {src.url}", item=src.url) from None
    except store_errors() as e:
        raise SourceError(f"cannot fetch: {type(e).__name__}: {e}", item=src.url, retryable=True) from e
    digests = hexdigests(hashers)
    if problem := checksum_problem(src, digests):
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(problem, item=src.url)
    durable.promote(partial, dest)
    return StagedFile(src, dest, size, sha256=digests["sha256"])

"""A remote file's ``.part`` on disk, for resuming it: the bytes received so far, and beside
them, in ``<name>.part.json``, the source (as the state file names it, no secret in clear)
and the validators (``ETag``, ``Last-Modified``) its first bytes came with.

An attempt or a later run resumes the ``.part`` with ``Range`` + ``If-Range`` only when the
``.part.json`` names the same source and holds a validator (a strong ``ETag``, else
``Last-Modified``); anything else is discarded and the file starts from byte 0. Once
verified, the ``.part`` is renamed into place as the staged file and its ``.part.json``
removed. Both files are created readable by the owner only. Every method touches the disk:
the download stage calls them in a thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

from etl.core import durable


def _private(path: str, flags: int) -> int:
    """``open``'s opener for staged files: created readable by the owner only."""
    return os.open(path, flags, durable.PRIVATE_MODE)


class PartFile:
    """The ``.part`` and ``.part.json`` of the source ``ident`` staged as ``staging_dir/name``."""

    def __init__(self, staging_dir: Path, name: str, ident: str) -> None:
        self.ident = ident
        self.final = staging_dir / name
        self.part = staging_dir / f"{name}.part"
        self.meta = staging_dir / f"{name}.part.json"

    def resume_point(self) -> tuple[int, str | None]:
        """Bytes to keep from an earlier attempt or run, and the validator for ``If-Range``."""
        try:
            size = self.part.stat().st_size
        except FileNotFoundError:
            size = 0
        meta = self.read_meta()
        validator = meta.get("etag") if not str(meta.get("etag", "")).startswith("W/") else None
        validator = validator or meta.get("last_modified")
        if size and meta.get("url") == self.ident and validator:
            return size, validator
        self.discard()
        return 0, None

    def read_meta(self) -> dict[str, Any]:
        try:
            return cast("dict[str, Any]", json.loads(self.meta.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    def write_meta(self, headers: Mapping[str, str]) -> None:
        etag, modified = headers.get("ETag"), headers.get("Last-Modified")
        meta = {"url": self.ident, "etag": etag, "last_modified": modified}
        durable.write_json(self.meta, meta, mode=durable.PRIVATE_MODE)

    def open(self, offset: int) -> IO[bytes]:
        """The ``.part`` to append to after ``offset`` bytes kept, or to write from byte 0."""
        return open(self.part, "ab" if offset else "wb", opener=_private)

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)

    def publish(self) -> None:
        """The verified ``.part`` becomes the staged file."""
        durable.promote(self.part, self.final)
        self.meta.unlink(missing_ok=True)

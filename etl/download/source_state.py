"""The download state file: per-URL validators of the last staged copy, for conditional GETs.

``SourceState.load`` reads ``{"version": 1, "files": {url: {name, etag, last_modified,
size, sha256[, md5]}}}``, where ``url`` is ``redact.url_key``'s form: a URL with a
secret (``user:pw@``, ``?token=``) is stored redacted plus a keyed hash, never in clear
(files of older versions are re-keyed on load) (an unreadable file is ignored with a warning: it is only a
cache); ``SourceState.save`` writes it atomically (temp file in the same folder, fsync,
``os.replace``: ``etl.core.durable``), at most every ``STATE_SAVE_SECONDS`` when throttled. ``durable.write_json``
is also used for the ``.part.json`` resume validators.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from etl.core import durable
from etl.core.records import Source
from etl.core.redact import state_secret, url_key

log = logging.getLogger("etl.download")  # the download stage's logger: messages stay under its name

# Least seconds between mid-run saves of the state file: more often loses less after a crash,
# but each save rewrites the whole file.
STATE_SAVE_SECONDS = 30.0


class SourceState:
    """Per-URL validators of the last staged copy (JSON, saved atomically), for conditional GETs."""

    def __init__(self, path: Path | None, entries: dict[str, dict[str, Any]], key: bytes = b"") -> None:
        self.path = path
        self.key = key
        self.entries = {url_key(url, key): e for url, e in entries.items()}  # older files named URLs in clear
        self._lock = asyncio.Lock()
        self._saved_at = time.monotonic()

    @classmethod
    def load(cls, path: Path | None) -> SourceState:
        if path is None:
            return cls(path, {})
        key = state_secret(path.parent)
        if not path.exists():
            return cls(path, {}, key)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            # It is only a cache: losing it costs one full download of every source.
            log.warning("ignoring unreadable state file %s: %s", path, e, extra={"stage": "download"})
            return cls(path, {}, key)
        return cls(path, entries, key)

    def ident(self, url: str) -> str:
        """The name this file gives ``url`` (``redact.url_key``)."""
        return url_key(url, self.key)

    async def save(self, keep: set[str] | None = None, *, throttle: bool = False) -> None:
        if self.path is None or (throttle and time.monotonic() - self._saved_at < STATE_SAVE_SECONDS):
            return
        async with self._lock:
            self._saved_at = time.monotonic()
            kept = None if keep is None else {self.ident(u) for u in keep}
            files = {u: e for u, e in self.entries.items() if kept is None or u in kept}
            await asyncio.to_thread(
                durable.write_json,
                self.path,
                {"version": 1, "files": files},
                indent=1,
                sort_keys=True,
                mode=durable.PRIVATE_MODE,
            )


def conditional_headers(entry: dict[str, Any] | None, staged: Path, src: Source) -> dict[str, str]:
    """``If-None-Match``/``If-Modified-Since`` for a conditional request of ``src``, from
    its remembered ``entry``; none (a plain GET) when there is no entry, the staged copy a
    304 would reuse is gone or has another size, or an expected checksum changed."""
    if not entry:
        return {}
    try:
        if staged.stat().st_size != entry.get("size"):
            return {}
    except FileNotFoundError:
        return {}
    for algo in ("sha256", "md5"):
        wanted = getattr(src, algo)
        if wanted and entry.get(algo) != wanted:
            return {}  # the expected checksum changed: the old copy cannot be trusted
    headers = {}
    if entry.get("etag"):
        headers["If-None-Match"] = entry["etag"]
    if entry.get("last_modified"):
        headers["If-Modified-Since"] = entry["last_modified"]
    return headers

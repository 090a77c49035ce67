"""The download state file: per-URL validators of the last staged copy, for conditional GETs.

``SourceState.load`` reads ``{"version": 1, "files": {url: {name, etag, last_modified,
size, sha256[, md5]}}}`` (an unreadable file is ignored with a warning: it is only a
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

log = logging.getLogger("etl.download")  # the download stage's logger: messages stay under its name

# Least seconds between mid-run saves of the state file: more often loses less after a crash,
# but each save rewrites the whole file.
STATE_SAVE_SECONDS = 30.0


class SourceState:
    """Per-URL validators of the last staged copy (JSON, saved atomically), for conditional GETs."""

    def __init__(self, path: Path | None, entries: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.entries = entries
        self._lock = asyncio.Lock()
        self._saved_at = time.monotonic()

    @classmethod
    def load(cls, path: Path | None) -> SourceState:
        if path is None or not path.exists():
            return cls(path, {})
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            # It is only a cache: losing it costs one full download of every source.
            log.warning("ignoring unreadable state file %s: %s", path, e, extra={"stage": "download"})
            return cls(path, {})
        return cls(path, entries)

    async def save(self, keep: set[str] | None = None, *, throttle: bool = False) -> None:
        if self.path is None or (throttle and time.monotonic() - self._saved_at < STATE_SAVE_SECONDS):
            return
        async with self._lock:
            self._saved_at = time.monotonic()
            files = {u: e for u, e in self.entries.items() if keep is None or u in keep}
            await asyncio.to_thread(
                durable.write_json, self.path, {"version": 1, "files": files}, indent=1, sort_keys=True
            )

"""The job's state folder: the run lock, atomic JSON files and the manifest that makes runs resume.

Layout of ``<job.state_dir>/<job.name>/``::

    lock            flock'd by the running process (the kernel drops it if the process dies)
    sources.json    per-URL validators (ETag, Last-Modified, size, sha256) from the download stage
    url.key         the key of the hashes that name URLs holding a secret (below)
    manifest.json   the sources the published output holds, and the sources a run has committed
    staging/        downloaded files (kept: a 304 on the next run reuses them)
    reports/        the last ``job.keep_reports`` run reports
    logs/           cron.log when the job runs from the line ``run.py crontab`` prints

Resume design (the per-run bookkeeping is ``etl.run.commits.Commits``): a run's temp folder
outlives the run until a later run publishes it::

    manifest.json                                 beside the output folder
    ├─ sources:  {url: entry}  ─── describes ──►  out/                      (published)
    └─ pending:  {run_id, tmp, publishing,        .out.tmp-<run_id>/        (this run's parts)
                  sources: {url: entry}} ──────►   _spool/part-00000-000000.arrow  committed: listed
                                                   _spool/part-00001-000000.arrow  not listed: purged
                                                   part-00000.parquet   output files: never listed,
                                                                        cut again on resume

    entry = {index, name, size, mtime_ns, ino, sha256, etag, last_modified, chunks,
             rows_in, rows_out, rows_rejected, parts: [{path, rows, bytes}]}

  Pending, a source's parts are its chunks' pieces (``etl.write.files``) and dead-letter
  files; published, they are its dead-letter files and spans ``{path, start, rows}`` of
  the output files holding its rows (what a later run carries over).

* **No secret in clear**: every file here is mode 0600 in a 0700 folder, and a URL with
  credentials or a secret query value (``user:pw@``, ``?token=``) is named by its redacted
  form plus a keyed hash of the whole URL (``etl.core.redact.url_key``, key in ``url.key``):
  readable, yet two URLs differing only in their token stay two sources. Manifests of
  older versions, which named such URLs in clear, are re-keyed when loaded.

* **Commit**: a source is committed once its reader has finished (so its chunk count is
  known) and every one of its chunks has been written (each part is written whole
  before its rename; a spooled piece is not fsynced, so it outlives a killed process but
  maybe not an OS crash). Only then is it added to ``pending.sources`` and the manifest
  saved (atomic replace, fsynced). So every listed part is complete, unless the OS
  crashed; files not listed are a killed run's half-work.
* **Resume** (next run, under the lock, before ``OutputWriter.clean_leftovers``): a
  pending temp folder is *adopted*: files not listed are deleted, listed sources whose
  parts are missing (or, for a spooled piece, not a whole Arrow stream of its committed
  size and rows: lost in an OS crash) or whose index moved are dropped, and the rest are skipped if their
  source is unchanged. ``clean_leftovers(keep=tmp)`` removes every other leftover.
* **Unchanged**: 304 with the recorded size, or a local file with the recorded size,
  mtime and inode, or failing those the same sha256. In ``overwrite`` mode an unchanged
  published source's parts are hard-linked from the output into the temp folder (renamed
  if the source's index moved), so the new output is what a clean run would write. In
  ``append`` mode it is simply not appended again.
* **Publish**: save ``pending.publishing = true``, publish (renames), then move pending
  into ``sources`` and save. A crash between: the temp folder only disappears by being
  published, so "publishing and no temp folder" means it was published, and the next
  run finishes the bookkeeping; "temp folder still there" means it was not (an
  overwrite swap cut halfway is put back by ``clean_leftovers``) and it is adopted. An
  append publish cut mid-way (``.append-parts`` present) is undone, not adopted.
* **Fingerprint**: the read, transform and output settings that shape the output. When
  it changes, pending work is dropped and, in overwrite mode, everything is processed
  again; append mode still never appends a source twice.
* ``--full-refresh`` ignores both ``sources`` and ``pending``.
* An interrupted run (SIGINT/SIGTERM) keeps its temp folder, if it committed anything,
  for the next run to adopt; a failed run discards it (as a kill -9 cannot, the next run
  adopts that one).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Self, cast

from etl.core import durable
from etl.core.config import JobConfig
from etl.core.errors import LockHeld
from etl.core.records import StagedFile
from etl.core.redact import state_secret, url_key

log = logging.getLogger("etl.state")

MANIFEST_VERSION = 1


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


class JobLock:
    """One run per job: an exclusive, non-blocking flock on ``<state>/lock``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, durable.PRIVATE_DIR_MODE)  # the job's own folder: reports, staged data
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, durable.PRIVATE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(f"skipped: already running (pid {holder} holds {self.path})", item=str(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# ------------------------------------------------------------------------ manifest


def fingerprint(cfg: JobConfig) -> str:
    """Hash of the settings that shape the output rows and files (not the source list)."""
    shaping = {
        "read": cfg.read.model_dump(mode="json", exclude={"threads", "max_record_bytes"}),
        "transform": cfg.transform.model_dump(mode="json", include={"steps", "on_error"}),
        "output": cfg.output.model_dump(
            mode="json",
            include={"path", "format", "compression", "partition_by", "target_file_size", "row_group_size"},
        ),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


class Manifest:
    """``<state>/manifest.json``: ``sources`` (what the output holds) and ``pending``."""

    def __init__(self, path: Path, data: dict[str, Any], key: bytes | None = None) -> None:
        self.path = path
        self.data = data
        self._key = key
        for sources in (data.get("sources"), (data.get("pending") or {}).get("sources")):
            if isinstance(sources, dict):  # older manifests named URLs with secrets in clear
                renamed = {self.ident(url): e for url, e in sources.items()}
                sources.clear()
                sources.update(renamed)

    @property
    def key(self) -> bytes:
        """The state folder's ``url.key``, read (or made) the first time a URL holding a
        secret is named: a dry run of a job without such URLs writes nothing."""
        if self._key is None:
            self._key = state_secret(self.path.parent)
        return self._key

    def ident(self, url: str) -> str:
        """The name this manifest gives ``url`` (``redact.url_key``)."""
        return url_key(url, lambda: self.key)

    @classmethod
    def load(cls, state_dir: Path) -> Manifest:
        path = state_dir / "manifest.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {MANIFEST_VERSION}")
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError, AttributeError) as e:
            # Losing it costs one full reprocessing, never a wrong output.
            log.warning("ignoring unreadable manifest %s: %s", path, e, extra={"stage": "state"})
            data = {}
        data.setdefault("version", MANIFEST_VERSION)
        data.setdefault("fingerprint", None)
        data.setdefault("sources", {})
        data.setdefault("pending", None)
        return cls(path, data)

    @property
    def published(self) -> dict[str, dict[str, Any]]:
        return cast("dict[str, dict[str, Any]]", self.data["sources"])

    @property
    def pending(self) -> dict[str, Any] | None:
        return cast("dict[str, Any] | None", self.data["pending"])

    def dump(self) -> bytes:
        # Compact: with thousands of sources, indenting triples the size and the time.
        return json.dumps(self.data, separators=(",", ":"), default=str).encode()

    def save(self, data: bytes | None = None) -> None:
        durable.write_bytes(self.path, self.dump() if data is None else data, mode=durable.PRIVATE_MODE)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def identity(staged: StagedFile) -> dict[str, Any]:
    """The cheap facts about a staged file: size, and for local files mtime and inode."""
    ident: dict[str, Any] = {"size": staged.size}
    if not staged.source.is_remote:
        st = staged.path.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino)
    return ident


def is_unchanged(staged: StagedFile, entry: dict[str, Any], ident: dict[str, Any], sha: Any) -> bool:
    """Same content as ``entry``: 304, or the same stat, or (hashing) the same sha256.

    ``sha`` is called to get the staged file's sha256 only when the cheap checks fail.
    """
    if entry.get("size") != ident["size"]:
        return False
    if staged.source.is_remote and staged.unchanged:
        return True
    if not staged.source.is_remote and all(entry.get(k) == ident[k] for k in ("mtime_ns", "ino")):
        return True
    return entry.get("sha256") is not None and entry["sha256"] == sha()

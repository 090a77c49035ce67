"""One run's bookkeeping against the manifest: which sources to skip, and when a source is
committed. The design (manifest layout, crash cases, diagram) is in ``etl.run.state``.

Called from the pipeline (``etl/pipeline.py``)::

    recover(sources) -> adopt       before OutputWriter.clean_leftovers(keep=adopt)
    begin(writer)                   pending = this run, its temp folder, adopted sources
    check(staged) -> bool           reader thread, per staged file: process it, or skip it
    read_done(source, chunks)       reader thread: the source's chunk count is known
    written(result, parts)          writer thread: one chunk's parts are in the temp folder
    publishing(); published()       around OutputWriter.publish()
    failed(interrupted) -> keep     after a failure or a signal: keep the temp folder?
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from etl.core.config import JobConfig
from etl.core.parts import APPEND_LIST, PIECE_EXT, SPOOL_DIR, piece_is_whole, renumbered
from etl.core.records import Source, StagedFile
from etl.run.state import (
    Manifest,
    file_sha256,
    fingerprint,
    identity,
    is_unchanged,
    read_json,
)

log = logging.getLogger("etl.state")

# Least seconds between mid-run manifest saves: more often redoes less work after a kill;
# each save rewrites the whole file (a few hundred bytes per source) with an fsync.
MANIFEST_SAVE_SECONDS = 1.0
# With many sources, serialising the manifest itself gets slow (~50 ms at 1,000 sources):
# saves are spaced to at least this many times the last one's serialising time, so they
# hold the commit lock (and stall writer threads) for at most ~1/N of the run.
MANIFEST_SAVE_SPACING = 20


@dataclass
class _Open:
    """A source being processed: its record so far and how many of its chunks are written."""

    url: str
    entry: dict[str, Any]
    total: int | None = None
    written: int = 0


@dataclass
class SourceStatus:
    index: int
    name: str
    status: str  # processed | resumed | unchanged
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    parts: int = 0


class Commits:
    """One run's bookkeeping against the manifest. ``check``, ``read_done`` and ``written``
    are called from reader and writer threads; everything else from the run's loop."""

    def __init__(self, cfg: JobConfig, run_id: str, full_refresh: bool) -> None:
        self.manifest = Manifest.load(cfg.job_state_dir)
        self.mode = cfg.output.mode
        self.target = Path(cfg.output.path)
        # A str is an object-store URL; CSV rows cannot be read back with their types.
        self.can_carry = not isinstance(cfg.output.path, str) and cfg.output.format == "parquet"
        self.run_id = run_id
        self.full_refresh = full_refresh
        self.fingerprint = fingerprint(cfg)
        self.sources_file = cfg.job_state_dir / "sources.json"
        self.adopted: dict[str, dict[str, Any]] = {}
        self.writer: Any = None
        self.statuses: dict[int, SourceStatus] = {}
        self._open: dict[int, _Open] = {}
        self._lock = threading.Lock()
        self._saved_at: float | None = None
        # Mid-run saves are serialised under _lock but written outside it (the fsync is
        # slow); sequence numbers keep an older snapshot from replacing a newer one.
        self._save_lock = threading.Lock()
        self._seq = 0
        self._saved_seq = 0
        self._save_every = MANIFEST_SAVE_SECONDS

    # ----------------------------------------------------------- start of the run

    def recover(self, sources: list[Source]) -> Path | None:
        """Settle what a dead run left; returns the temp folder to adopt (or None).

        Call under the job lock, before ``OutputWriter.clean_leftovers(keep=...)``.
        """

        m = self.manifest
        p = m.pending
        if p and p.get("publishing") and not Path(p["tmp"]).exists():
            log.info(
                "the previous run %s published but died before saving the manifest; settling",
                p["run_id"],
                extra={"stage": "state"},
            )
            self._settle(p)
            p = None
        adopt: Path | None = None
        if p:
            tmp = Path(p["tmp"])
            reason = (
                "--full-refresh"
                if self.full_refresh
                else "the job's settings changed"
                if p.get("fingerprint") != self.fingerprint
                else "its temp folder is gone"
                if not tmp.is_dir()
                else "it died while appending"
                if (tmp / APPEND_LIST).exists()
                else ""
            )
            if reason:
                log.info("not resuming run %s: %s", p["run_id"], reason, extra={"stage": "state"})
            else:
                adopt = tmp
                self.adopted = _keep_intact(tmp, p["sources"], {self.manifest.ident(s.url): s.index for s in sources})
                log.info(
                    "resuming run %s: %d committed source(s) in %s",
                    p["run_id"],
                    len(self.adopted),
                    tmp,
                    extra={"stage": "state"},
                )
        m.data["pending"] = None
        m.save()  # before clean_leftovers removes a temp folder this manifest still names
        return adopt

    def begin(self, writer: Any) -> None:
        self.writer = writer
        self.manifest.data["pending"] = {
            "run_id": self.run_id,
            "tmp": str(writer.tmp),
            "fingerprint": self.fingerprint,
            "publishing": False,
            "sources": dict(self.adopted),
        }
        self.manifest.save()
        self._saved_at = None

    # ------------------------------------------------- per source (reader threads)

    def check(self, staged: StagedFile) -> bool:
        """True when ``staged`` must be read and transformed; False when it is skipped."""
        src = staged.source
        ident = identity(staged)
        sha: dict[str, str] = {"v": staged.sha256} if staged.sha256 else {}

        def sha256() -> str:  # hashed here only when the download stage did not
            if "v" not in sha:
                sha["v"] = file_sha256(staged.path)
            return sha["v"]

        url = self.manifest.ident(src.url)  # as the manifest names it: no secret in clear
        if (entry := self.adopted.get(url)) is not None:
            if is_unchanged(staged, entry, ident, sha256):
                self._skip(src, entry, "resumed")
                self._total(src, int(entry.get("chunks", 0)))  # its pieces were adopted with the folder
                return False
            self._forget_adopted(url, entry)
        entry = self._published_entry(url)
        if entry is not None and is_unchanged(staged, entry, ident, sha256):
            if self.mode == "append":
                self._skip(src, entry, "unchanged")
                self._total(src, 0)
                return False
            carried = self._carry(src, entry)
            if carried is not None:
                self._commit(src, carried)
                self._skip(src, carried, "unchanged")
                return False
        record = {
            "index": src.index,
            "name": src.name,
            **ident,
            "sha256": sha256(),
            "rows_in": 0,
            "rows_out": 0,
            "rows_rejected": 0,
            "parts": [],
        }
        with self._lock:
            self._open[src.index] = _Open(url, record)
            self.statuses[src.index] = SourceStatus(src.index, src.name, "processed")
        if hasattr(self.writer, "admit"):
            self.writer.admit(src.index)  # its chunks may go into files before its count is known
        return True

    def read_done(self, src: Source, chunks: int) -> None:
        with self._lock:
            o = self._open[src.index]
            o.total = chunks
            snap = self._maybe_commit(o)
        self._flush(snap)
        self._total(src, chunks)

    def _total(self, src: Source, chunks: int) -> None:
        """Tell the writer how many chunks ``src`` has: its files are cut in serial order."""
        if hasattr(self.writer, "source_total"):
            self.writer.source_total(src.index, chunks)

    def written(self, result: Any, parts: list[tuple[str, int, int]]) -> None:
        """Every part of one ``ChunkResult`` is in the temp folder: (relpath, rows, bytes)."""
        with self._lock:
            o = self._open[result.source_index]
            e = o.entry
            e["rows_in"] += result.rows_in
            e["rows_out"] += result.rows_out
            e["rows_rejected"] += result.rows_rejected
            e["parts"] += [{"path": p, "rows": r, "bytes": b} for p, r, b in parts]
            o.written += 1
            snap = self._maybe_commit(o)
        self._flush(snap)

    # --------------------------------------------------------------- end of the run

    def publishing(self) -> None:
        with self._lock:
            self.manifest.data["pending"]["publishing"] = True
            self.manifest.save()

    def published(self) -> None:
        with self._lock:
            pending = self.manifest.data["pending"]
            spans = self.writer.spans() if hasattr(self.writer, "spans") else {}
            for e in pending["sources"].values():
                # Published, a source's rows are where the file cutter put them: spans of
                # output files (what a later run carries over), besides its dead-letter files.
                kept = [p for p in e["parts"] if not p["path"].startswith(f"{SPOOL_DIR}/") and "start" not in p]
                e["parts"] = kept + spans.get(e["index"], [])
            self._settle(pending)

    def failed(self, interrupted: bool = False) -> bool:
        """Save what is committed; True when the temp folder should be kept for the next run:
        only after a signal (a failed job is usually rerun after a fix, maybe of the config)."""
        with self._lock:
            pending = self.manifest.pending
            keep = bool(interrupted and pending and pending["sources"] and not pending["publishing"])
            if not keep:
                self.manifest.data["pending"] = None  # before the temp folder is discarded
            self.manifest.save()
            return keep

    def plan(self, sources: list[Source]) -> list[str]:
        """What a run would do with each source, without changing anything (``--dry-run``)."""
        p = self.manifest.pending
        usable = p and not self.full_refresh and p.get("fingerprint") == self.fingerprint
        adopted = p["sources"] if usable and p else {}
        out = []
        for src in sources:
            url = self.manifest.ident(src.url)
            entry = adopted.get(url) or self._published_entry(url)
            how = "resume (committed by run {})".format(p and p["run_id"]) if url in adopted else "skip"
            if entry is None:
                out.append("fetch and process" if src.is_remote else "process")
            elif src.is_remote:
                out.append(f"conditional GET; {how} if not modified, else process")
            else:
                path = Path(src.url)
                staged = StagedFile(src, path, path.stat().st_size)
                same = is_unchanged(staged, entry, identity(staged), lambda p=path: file_sha256(p))
                out.append(f"{how}: unchanged" if same else "process: changed")
        return out

    def report(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(s) for _, s in sorted(self.statuses.items())]

    # ------------------------------------------------------------------ internals

    def _published_entry(self, url: str) -> dict[str, Any] | None:
        if self.full_refresh:
            return None
        if self.mode == "overwrite" and self.manifest.data["fingerprint"] != self.fingerprint:
            return None
        if self.mode == "overwrite" and not self.can_carry:
            return None  # object-store output: parts cannot be linked over, so process again
        return self.manifest.published.get(url)

    def _skip(self, src: Source, entry: dict[str, Any], status: str) -> None:
        with self._lock:
            self.statuses[src.index] = SourceStatus(
                src.index,
                src.name,
                status,
                entry.get("rows_in", 0),
                entry.get("rows_out", 0),
                entry.get("rows_rejected", 0),
                len(entry.get("parts", [])),
            )
        log.info("%s: not processed again", status, extra={"stage": "state", "source": src.name})

    def _carry(self, src: Source, entry: dict[str, Any]) -> dict[str, Any] | None:
        """Link an unchanged source's published files (dead-letter files) into the temp
        folder, and have the writer read its rows back from the output files (spans, with
        ``start``) in its place in the serial order; None if any file is gone."""
        spans = [p for p in entry["parts"] if "start" in p]
        moves = [(p, renumbered(p["path"], src.index)) for p in entry["parts"] if "start" not in p]
        if not all((self.target / p["path"]).is_file() for p in entry["parts"]):
            log.warning(
                "%s: published parts are missing; processing it again",
                src.name,
                extra={"stage": "state", "source": src.name},
            )
            return None
        for p, new in moves:
            self.writer.add_existing(new, self.target / p["path"])
        if hasattr(self.writer, "add_rows"):
            self.writer.add_rows(
                src.index,
                [(self.target / p["path"], p["path"].rpartition("/")[0], p["start"], p["rows"]) for p in spans],
            )
        # Rows carried over are in no file of the temp folder: a resumed run carries them again.
        parts = [p | {"path": new} for p, new in moves] + spans
        return entry | {"index": src.index, "name": src.name, "parts": parts}

    def _forget_adopted(self, url: str, entry: dict[str, Any]) -> None:
        for p in entry["parts"]:
            self.writer.remove(p["path"])
        with self._lock:
            self.adopted.pop(url, None)
            self.manifest.data["pending"]["sources"].pop(url, None)
            snap = self._snapshot()
        self._flush(snap)

    def _commit(self, src: Source, entry: dict[str, Any]) -> None:
        with self._lock:
            snap = self._store(self.manifest.ident(src.url), entry)
        self._flush(snap)

    def _maybe_commit(self, o: _Open) -> tuple[int, bytes] | None:
        """Caller holds the lock."""
        if o.total is None or o.written < o.total:
            return None
        e = o.entry
        self._open.pop(e["index"])
        s = self.statuses[e["index"]]
        s.rows_in, s.rows_out, s.rows_rejected, s.parts = (
            e["rows_in"],
            e["rows_out"],
            e["rows_rejected"],
            len(e["parts"]),
        )
        return self._store(o.url, e | {"run_id": self.run_id, "committed_at": time.time(), "chunks": o.total})

    def _store(self, url: str, entry: dict[str, Any]) -> tuple[int, bytes] | None:
        """Caller holds the lock; returns a snapshot to ``_flush`` when a save is due."""
        self.manifest.data["pending"]["sources"][url] = entry
        now = time.monotonic()
        if self._saved_at is not None and now - self._saved_at < self._save_every:
            return None  # saved by a later commit, or at the end of the run
        self._saved_at = now
        return self._snapshot()

    def _snapshot(self) -> tuple[int, bytes]:
        """Caller holds the lock."""
        self._seq += 1
        start = time.perf_counter()
        data = self.manifest.dump()
        self._save_every = max(MANIFEST_SAVE_SECONDS, MANIFEST_SAVE_SPACING * (time.perf_counter() - start))
        return self._seq, data

    def _flush(self, snap: tuple[int, bytes] | None) -> None:
        if snap is None:
            return
        seq, data = snap
        with self._save_lock:
            if seq <= self._saved_seq:
                return  # a newer snapshot is already on disk
            self.manifest.save(data)
            self._saved_seq = seq
        committed = len(self.manifest.data["pending"]["sources"])
        log.info("manifest saved: %d source(s) committed", committed, extra={"stage": "state"})

    def _settle(self, pending: dict[str, Any]) -> None:
        """The pending run's output is published: its sources become the manifest's."""
        validators = read_json(self.sources_file, {}).get("files", {})
        entries = {
            url: e | {k: validators.get(url, {}).get(k) for k in ("etag", "last_modified")}
            for url, e in pending["sources"].items()
        }
        if self.mode == "overwrite":
            self.manifest.data["sources"] = entries
        else:
            self.manifest.published.update(entries)
        self.manifest.data["fingerprint"] = pending["fingerprint"]
        self.manifest.data["pending"] = None
        self.manifest.save()


def _whole(path: Path, part: dict[str, Any]) -> bool:
    """A committed part is there as committed; a spooled piece (written without fsync) is
    also read back as an Arrow stream of its rows (``etl.core.parts.piece_is_whole``)."""
    if path.name.endswith(f".{PIECE_EXT}") and part["path"].startswith(f"{SPOOL_DIR}/"):
        return piece_is_whole(path, part["rows"], part["bytes"])
    return path.is_file() and path.stat().st_size == part["bytes"]


def _keep_intact(tmp: Path, sources: dict[str, dict[str, Any]], index_of: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Of an adopted temp folder, keep the committed sources that are still listed at the
    same index and whose parts are all there; delete every other file."""
    kept: dict[str, dict[str, Any]] = {}
    for url, e in sources.items():
        intact = all("start" not in p and _whole(tmp / p["path"], p) for p in e["parts"])
        if intact and index_of.get(url) == e["index"]:
            kept[url] = e
    listed = {p["path"] for e in kept.values() for p in e["parts"]}
    for path in sorted(tmp.rglob("*"), reverse=True):  # children before their folders
        rel = str(path.relative_to(tmp))
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif rel not in listed:
            path.unlink()
    return kept

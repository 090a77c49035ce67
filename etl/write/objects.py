"""Outputs on object storage: ``s3://bucket/prefix/`` and any other fsspec URL
(see ``etl.core.objstore``).

Output (``ObjectOutputWriter``), atomic for readers that follow the manifest::

    <prefix>/_runs/<run_id>/month=2026-01/part-00000.parquet          a run's files
    <prefix>/_runs/<run_id>/_rejected/rejected-00000-000000.jsonl      its dead-letter rows
    <prefix>/_manifests/<run_id>.json                                  written after every part
    <prefix>/_latest                                                   {"run_id", "manifest"}: last

    Workers' pieces are spooled in a local temp folder (``tempfile``) and cut into output
    files there (``etl.write.files``); each file is uploaded once it is closed, and the
    local folder is removed at publish or discard.

    Object stores have no rename, so a run's parts stay under its own prefix and the
    manifest (one PUT, atomic) is the commit: it lists every file of the dataset (in
    ``append`` mode the previous manifest's files too), then ``_latest`` is switched to it.
    A failed run writes no manifest and deletes its prefix; ``_latest`` still names the
    previous run. Superseded runs are deleted after ``KEEP_RUNS`` newer ones, so a reader
    that fetched the previous ``_latest`` can finish. Folders starting with ``_`` are
    skipped by pyarrow and Spark, so listing ``<prefix>`` naively shows nothing half-done.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.objstore import filesystem, store_errors, url_of
from etl.core.parts import PIECE_EXT, REJECTS_DIR, SPOOL_DIR, piece_key
from etl.core.records import Part
from etl.write.folder import OutputWriter

log = logging.getLogger("etl.objectstore")

RUNS_DIR = "_runs"
MANIFESTS_DIR = "_manifests"
LATEST = "_latest"
# Published runs kept besides the newest: a reader that fetched the previous manifest a
# moment before the switch can still read it; more costs storage for old outputs.
KEEP_RUNS = 1
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class ObjectOutputWriter(OutputWriter):
    """``OutputWriter`` for an object-store prefix: a run prefix, then manifest, then ``_latest``.

    ``etl.write.stage.open_writer`` returns one of these when ``out.path`` is a URL.
    """

    def __init__(self, out: OutputConfig, run_id: str, adopt: Path | None = None) -> None:
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run_id must match {_RUN_ID.pattern}, got {run_id!r}")
        if adopt is not None:
            log.warning("object-store outputs do not resume a dead run's parts; writing them again")
        self.out = out
        self.run_id = run_id
        self.url = str(out.path).rstrip("/")
        self.fs, self.root = filesystem(self.url, key="output.path")
        self.prefix = f"{RUNS_DIR}/{run_id}"
        # For etl.run.state's bookkeeping only: never a local folder, so a dead run is not adopted.
        self.tmp = Path(f"{self.url}/{self.prefix}")
        self._objects: dict[str, tuple[int, int]] = {}  # relpath -> (rows, bytes)
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}  # rows of each spooled piece (see OutputWriter)
        self._finished = False
        self._written: set[str] = set()
        self.local = Path(tempfile.mkdtemp(prefix="etl-out-"))  # spool and files being cut
        self._start_cutter()

    def write(self, part: Part) -> str:
        relpath = _check_relpath(part.relpath)
        if relpath.endswith(f".{PIECE_EXT}"):
            piece_key(relpath)
            spooled = f"{SPOOL_DIR}/{relpath}"
            try:  # no fsync: an object-store run is never resumed from its spool
                (self.local / spooled).parent.mkdir(parents=True, exist_ok=True)
                if part.file:
                    os.replace(part.file, self.local / spooled)
                else:
                    (self.local / spooled).write_bytes(part.data)
            except OSError as e:
                raise OutputError(f"cannot spool a chunk: {e}", item=str(self.local / spooled)) from e
            with self._lock:
                self._rows[spooled] = part.rows
            return spooled
        self._put(relpath, part.data, part.rows)
        return relpath

    def open_file(self, relpath: str) -> BinaryIO:
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        path = self.local / "files" / relpath
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "wb")
        except OSError as e:
            raise OutputError(f"cannot write file: {e}", item=str(path)) from e

    def wrote(self, f: BinaryIO) -> None:
        pass  # a local copy, read back for the upload: kept in the page cache

    def close_file(self, relpath: str, f: BinaryIO, rows: int) -> None:
        """Upload a finished file (one PUT, or a multipart upload for a large one)."""
        local = self.local / "files" / relpath
        f.close()
        self._call(self.fs.put_file, str(local), f"{self.root}/{self.prefix}/{relpath}")
        size = local.stat().st_size
        os.unlink(local)
        with self._lock:
            self._objects[relpath] = (rows, size)

    def write_rejects(self, part: Part) -> str:
        relpath = f"{REJECTS_DIR}/{_check_relpath(part.relpath)}"
        self._put(relpath, part.data, part.rows)
        return relpath

    def add_existing(self, relpath: str, source: Path) -> None:
        raise OutputError("carrying parts over from a local output is not supported on object storage", item=self.url)

    def remove(self, relpath: str) -> None:
        if relpath.startswith(f"{SPOOL_DIR}/"):
            self.cutter.forget(piece_key(relpath.removeprefix(f"{SPOOL_DIR}/"))[1])
            return
        with self._lock:
            self._objects.pop(relpath, None)
        self._call(self.fs.rm, f"{self.root}/{self.prefix}/{relpath}", missing_ok=True)

    def publish(self) -> list[str]:
        """Write the manifest, then point ``_latest`` at it; returns this run's files."""
        if self._finished:
            raise OutputError("publish after publish or discard", item=self.url)
        self._finished = True
        shutil.rmtree(self.local, ignore_errors=True)
        previous = _read_latest(self.fs, self.root, self.url)
        mine = sorted(self._objects)
        files = [self._entry(r) for r in mine if not r.startswith(f"{REJECTS_DIR}/")]
        rejected = [self._entry(r) for r in mine if r.startswith(f"{REJECTS_DIR}/")]
        if self.out.mode == "append" and previous is not None:
            files = previous["files"] + files
            rejected = previous.get("rejected", []) + rejected
        manifest = {
            "version": 1,
            "run_id": self.run_id,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": self.out.mode,
            "format": self.out.format,
            "partition_by": self.out.partition_by,
            "previous": previous and previous["run_id"],
            "files": files,
            "rejected": rejected,
        }
        manifest_path = f"{MANIFESTS_DIR}/{self.run_id}.json"
        self._call(self.fs.pipe_file, f"{self.root}/{manifest_path}", _json(manifest))
        self._call(
            self.fs.pipe_file, f"{self.root}/{LATEST}", _json({"run_id": self.run_id, "manifest": manifest_path})
        )
        _prune(self.fs, self.root, self.url, manifest)
        return [f"{self.prefix}/{r}" for r in mine]

    def discard(self) -> None:
        """Delete this run's prefix; no manifest was written. Never raises."""
        self._finished = True
        self.cutter.abort()
        shutil.rmtree(self.local, ignore_errors=True)
        try:
            self.fs.rm(f"{self.root}/{self.prefix}", recursive=True)
        except FileNotFoundError:
            pass
        except store_errors() as e:
            log.warning("could not delete %s/%s: %s (clean_leftovers will retry)", self.url, self.prefix, e)

    @staticmethod
    def clean_leftovers(out: OutputConfig, keep: Path | None = None) -> list[Any]:
        """Delete run prefixes that have no manifest (dead runs). Call it under the job lock."""
        url = str(out.path).rstrip("/")
        fs, root = filesystem(url, key="output.path")
        try:
            fs.invalidate_cache()
            runs = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{RUNS_DIR}", detail=False)}
            manifests = {_manifest_id(p) for p in fs.ls(f"{root}/{MANIFESTS_DIR}", detail=False)}
        except FileNotFoundError:
            return []
        except store_errors() as e:
            raise OutputError(f"cannot list the output: {type(e).__name__}: {e}", item=url) from e
        dead = sorted(runs - manifests)
        for run_id in dead:
            fs.rm(f"{root}/{RUNS_DIR}/{run_id}", recursive=True)
        return [f"{url}/{RUNS_DIR}/{r}" for r in dead]

    # ------------------------------------------------------------------ internals

    def _put(self, relpath: str, data: bytes, rows: int) -> None:
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        self._call(self.fs.pipe_file, f"{self.root}/{self.prefix}/{relpath}", data)
        with self._lock:
            self._objects[relpath] = (rows, len(data))

    def _entry(self, relpath: str) -> dict[str, Any]:
        rows, size = self._objects[relpath]
        return {"path": f"{self.prefix}/{relpath}", "rows": rows, "bytes": size}

    def _call(self, fn: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(path, *args, **kwargs)
        except store_errors() as e:
            raise OutputError(f"cannot write: {type(e).__name__}: {e}", item=url_of(self.fs, path)) from e


def _check_relpath(relpath: str) -> str:
    path = PurePosixPath(relpath)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise OutputError("part path must be relative and stay inside the output prefix", item=relpath)
    return str(path)


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode()


def _manifest_id(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".json")


def read_manifest(url: str) -> dict[str, Any] | None:
    """The manifest ``_latest`` names under the output ``url``, or None before any run."""
    fs, root = filesystem(url.rstrip("/"), key="output.path")
    return _read_latest(fs, root, url)


def _read_latest(fs: Any, root: str, url: str) -> dict[str, Any] | None:
    try:
        fs.invalidate_cache()
        latest = json.loads(fs.cat_file(f"{root}/{LATEST}"))
        return cast("dict[str, Any]", json.loads(fs.cat_file(f"{root}/{latest['manifest']}")))
    except FileNotFoundError:
        return None
    except store_errors() + (ValueError, KeyError) as e:
        raise OutputError(f"cannot read the current manifest: {type(e).__name__}: {e}", item=url) from e


def _prune(fs: Any, root: str, url: str, newest: dict[str, Any]) -> None:
    """Delete runs and manifests no longer needed (see ``KEEP_RUNS``). Best effort: a
    failure leaves storage behind, never a broken dataset."""
    try:
        chain, manifest = [newest], newest
        while len(chain) <= KEEP_RUNS and manifest.get("previous"):
            manifest = json.loads(fs.cat_file(f"{root}/{MANIFESTS_DIR}/{manifest['previous']}.json"))
            chain.append(manifest)
        keep_manifests = {m["run_id"] for m in chain}
        keep_runs = keep_manifests | {f["path"].split("/")[1] for m in chain for f in m["files"] + m["rejected"]}
        for path in fs.ls(f"{root}/{MANIFESTS_DIR}", detail=False):
            run_id = _manifest_id(path)
            if run_id not in keep_manifests:
                if fs.exists(f"{root}/{RUNS_DIR}/{run_id}") and run_id not in keep_runs:
                    fs.rm(f"{root}/{RUNS_DIR}/{run_id}", recursive=True)
                fs.rm(path)
    except store_errors() + (ValueError, KeyError) as e:
        log.warning("could not delete superseded runs under %s: %s", url, e)

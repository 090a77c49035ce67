"""The output folder: part names, hive partition folders, a private temp folder, publishing.

``encode_parts`` (inside worker processes)
    In: a transformed DataFrame and the ``OutputConfig``. Out: ``Part`` records whose
    ``relpath`` is ``col=value/.../part-{source:05d}-{chunk:06d}.{parquet|csv}``, so sorting
    the paths gives the serial order.

``OutputWriter`` (in the parent's writer thread pool)
    Parts go to ``<parent>/.<name>.tmp-<run_id>`` beside the target (same filesystem, so
    publishing is a rename). ``publish()`` makes the run's output visible once every
    chunk succeeded; ``discard()`` removes it after a failure. Call either one after the
    writer threads have stopped. Until ``publish()`` the previous output is never touched.

    * overwrite: target -> ``.<name>.old-<run_id>``, temp -> target, old removed. Between
      the two renames (microseconds) the target path does not exist; a crash there is
      repaired by ``clean_leftovers``, which puts the old folder back.
    * append: each part is moved into the existing target (into an absent target the
      whole folder is renamed, as for overwrite). Part names carry the run id
      (``part-<run_id>-00003-000012.parquet``) so runs never collide; the writer adds it
      when a part is written, so the temp folder already has the final layout. Before
      moving, the list of parts is saved in the temp folder; a failed publish, and
      ``clean_leftovers`` after a crash, use it to take back parts already moved, so a
      failed append leaves the previous output as it was. Readers may see a prefix of
      the new parts while the moves run.

Durability: each file is fsynced before its rename and folders are fsynced after
publishing (one fsync per file: a few ms each on spinning disks, negligible on SSDs).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from etl.core import durable
from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.records import Part

# Reading and IPC live in etl.read.formats; re-exported because stages import them from here.
from etl.read.formats import decode_ipc, encode_ipc, encode_table, read_chunks  # noqa: F401

__all__ = ["OutputWriter", "encode_parts", "read_chunks", "encode_ipc", "decode_ipc"]

log = logging.getLogger(__name__)

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Characters Hive percent-encodes in partition folder names (FileUtils.escapePathName).
_HIVE_UNSAFE = frozenset(chr(c) for c in range(0x20)) | set("\"#%'*/:=?\\\x7f{[]^")
_MAX_NAME_BYTES = 255  # longest file or folder name on common filesystems
REJECTS_DIR = "_rejected"  # readers (pyarrow, Spark) skip folders starting with "_"
APPEND_LIST = ".append-parts"  # in the temp folder: parts an append publish is moving
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


# ------------------------------------------------------------------------- encoding


def encode_parts(
    df: pd.DataFrame,
    out: OutputConfig,
    *,
    source_index: int,
    chunk_index: int,
    label: str = "",
) -> list[Part]:
    """Encode one transformed chunk as output files; an empty frame gives no parts.

    With ``out.partition_by``, rows go to hive folders (``col=value/``, in the order
    given, values percent-encoded as Hive does, null and "" as ``HIVE_NULL``) and the
    partition columns are left out of the files, as pyarrow and Spark do. Rows keep
    the chunk's order. ``label`` names the chunk in errors (pass ``Chunk.label``).
    """
    label = label or f"source {source_index}[chunk {chunk_index}]"
    if len(df) == 0:
        return []
    table = _to_arrow(df, label)
    name = f"part-{source_index:05d}-{chunk_index:06d}.{out.format}"
    if not out.partition_by:
        return [Part(name, _encode(table, out, label), table.num_rows)]
    _check_partition_columns(table, out.partition_by, label)
    parts = []
    for folder, rows in _partitions(table, out.partition_by, label):
        piece = table.take(rows).drop_columns(out.partition_by)
        parts.append(Part(f"{folder}/{name}", _encode(piece, out, label), piece.num_rows))
    return parts


def _to_arrow(df: pd.DataFrame, label: str) -> pa.Table:
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise OutputError(f"cannot convert the chunk to Arrow for writing: {e}", item=label) from e


def _encode(table: pa.Table, out: OutputConfig, label: str) -> bytes:
    try:
        return encode_table(table, out)
    except (pa.ArrowException, OSError) as e:  # e.g. nested columns in CSV
        raise OutputError(f"cannot encode the chunk as {out.format}: {e}", item=label) from e


def _check_partition_columns(table: pa.Table, columns: list[str], label: str) -> None:
    for column in columns:
        if column not in table.column_names:
            raise OutputError(
                f"output.partition_by names column {column!r}, which the data does not "
                f"have; columns are: {', '.join(table.column_names)}",
                item=label,
            )
    if set(table.column_names) <= set(columns):
        raise OutputError(
            f"output.partition_by uses every column ({', '.join(columns)}); the files "
            "would hold no data: keep at least one column out of it",
            item=label,
        )


def _partitions(
    table: pa.Table, columns: list[str], label: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(hive folder, row indices in chunk order) per folder, in order of first appearance.

    Keys are grouped by folder name, not by value: null and "" (or 1 and "1" in a mixed
    column) share a folder and must share one part file.
    """
    keyed = table.select(columns).append_column("__row", pa.arange(0, table.num_rows))
    groups = keyed.group_by(columns, use_threads=False).aggregate([("__row", "list")])
    rows = groups.column("__row_list")
    folders: dict[str, list[np.ndarray]] = {}
    for i, key in enumerate(groups.select(columns).to_pylist()):
        folder = "/".join(_hive_segment(c, key[c], label) for c in columns)
        folders.setdefault(folder, []).append(rows[i].values.to_numpy())
    for folder, pieces in folders.items():
        yield folder, pieces[0] if len(pieces) == 1 else np.sort(np.concatenate(pieces))


def _hive_segment(column: str, value: Any, label: str) -> str:
    segment = f"{_hive_escape(column)}={_hive_escape(_hive_value(value))}"
    if len(segment.encode()) > _MAX_NAME_BYTES:
        raise OutputError(
            f"partition folder for column {column!r} would be longer than {_MAX_NAME_BYTES} "
            f"bytes, the filesystem limit (value starts {str(value)[:60]!r})",
            item=label,
        )
    return segment


def _hive_value(value: Any) -> str:
    if value is None or value == "":
        return HIVE_NULL  # as Hive and Spark do: "col=" could not be read back
    if isinstance(value, bool):
        return "true" if value else "false"  # as Spark writes them
    return str(value)  # dates: 2026-01-01; datetimes: 2026-01-01 10:00:00


def _hive_escape(text: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in _HIVE_UNSAFE else c for c in text)


# --------------------------------------------------------------------------- writer


class OutputWriter:
    """Collects one run's parts in a temp folder and publishes them, or discards them."""

    def __new__(cls, out: OutputConfig, *args: Any, **kwargs: Any) -> "OutputWriter":
        # An object-store URL (a str; local paths are Path) gets the manifest-publishing
        # writer of etl.download.objects, so the pipeline needs no branch of its own.
        if cls is OutputWriter and isinstance(out.path, str):
            from etl.download.objects import ObjectOutputWriter

            return super().__new__(ObjectOutputWriter)
        return super().__new__(cls)

    def __init__(self, out: OutputConfig, run_id: str, adopt: Path | None = None) -> None:
        """``adopt``: a temp folder a dead run of this job left (see ``etl.run.state``); its
        files become this run's, so committed parts are not written again."""
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run_id must match {_RUN_ID.pattern}, got {run_id!r}")
        self.out = out
        self.run_id = run_id
        self.target = Path(out.path)
        self.tmp = adopt if adopt is not None else _sibling(self.target, "tmp", run_id)
        self._written: set[str] = set() if adopt is None else _files_under(adopt)
        self._lock = threading.Lock()
        self._finished = False
        if self.target.exists() and not self.target.is_dir():
            raise OutputError("output path exists and is not a folder", item=str(self.target))
        try:
            self.tmp.mkdir(parents=True, exist_ok=adopt is not None)
        except OSError as e:
            raise OutputError(f"cannot create temp folder: {e}", item=str(self.tmp)) from e

    def write(self, part: Part) -> str:
        """Write one part into the temp folder; returns its final relpath. Thread-safe;
        rewriting a part replaces it."""
        relpath = self._final_relpath(part.relpath)
        self._store(relpath, part.data)
        return relpath

    def write_rejects(self, part: Part) -> str:
        """Write dead-letter rows under ``_rejected/`` (published with the rest)."""
        relpath = f"{REJECTS_DIR}/{self._final_relpath(part.relpath)}"
        self._store(relpath, part.data)
        return relpath

    def add_existing(self, relpath: str, source: Path) -> None:
        """Put an already-published file into the temp folder under ``relpath`` (a hard
        link, or a copy across filesystems): overwrite runs carry unchanged sources' parts."""
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        dest = self.tmp / relpath
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
        except OSError as e:
            raise OutputError(f"cannot carry over {source}: {e}", item=relpath) from e
        with self._lock:
            self._written.add(relpath)

    def remove(self, relpath: str) -> None:
        """Drop a part from the temp folder (an adopted source that changed since)."""
        (self.tmp / relpath).unlink(missing_ok=True)
        with self._lock:
            self._written.discard(relpath)

    def publish(self) -> list[str]:
        """Make the run's output visible; returns the published relpaths, sorted.

        Call it once every part is written. On ``OutputError`` nothing was published
        (parts an append had moved are taken back); ``discard()`` then removes the rest.
        """
        self._finish("publish")
        relpaths = sorted(self._written)
        try:
            durable.fsync_tree(self.tmp)
        except OSError as e:
            raise OutputError(f"cannot sync the temp folder: {e}", item=str(self.tmp)) from e
        if self.out.mode == "overwrite" or not self.target.exists():
            self._swap_in()
        else:
            self._move_in(relpaths)
        return relpaths

    def discard(self) -> None:
        """Remove the temp folder (and parts a failed append moved); the previous output
        is left as it was. Never raises: it runs while another error is propagating."""
        self._finished = True
        try:
            _undo_append(self.target, self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
        except OSError as e:
            log.warning("could not discard %s: %s (clean_leftovers will retry)", self.tmp, e)

    @staticmethod
    def clean_leftovers(out: OutputConfig, keep: Path | None = None) -> list[Path]:
        """Repair what dead runs left beside ``out.path``; returns the folders removed or
        restored. ``keep`` is a temp folder the manifest adopts for resuming. Call it only
        while holding the job's lock: a live run's temp folder looks the same as a dead one's."""
        if isinstance(out.path, str):  # an object-store URL
            from etl.download.objects import ObjectOutputWriter

            return ObjectOutputWriter.clean_leftovers(out, keep)
        target = Path(out.path)
        if not target.parent.is_dir():
            return []
        stem = glob.escape(f".{target.name}")
        handled = []
        try:
            for tmp in sorted(target.parent.glob(f"{stem}.tmp-*")):
                if keep is not None and tmp == keep:
                    continue
                _undo_append(target, tmp)
                shutil.rmtree(tmp)
                handled.append(tmp)
            olds = sorted(target.parent.glob(f"{stem}.old-*"))
            if olds and not target.exists():
                if len(olds) > 1:
                    raise OutputError(
                        "the output folder is missing and several old copies exist: "
                        f"{', '.join(map(str, olds))}; rename the right one back by hand",
                        item=str(target),
                    )
                os.rename(olds[0], target)  # a crash between the two renames of a publish
                handled.append(olds.pop())
            for old in olds:
                shutil.rmtree(old)
                handled.append(old)
        except OSError as e:
            raise OutputError(f"cannot clean up after an earlier run: {e}", item=str(target)) from e
        return handled

    # ----------------------------------------------------------------- internals

    def _final_relpath(self, relpath: str) -> str:
        path = PurePosixPath(relpath)
        if path.is_absolute() or ".." in path.parts or not path.name:
            raise OutputError(
                "part path must be relative and stay inside the output folder", item=relpath
            )
        if self.out.mode == "append":
            path = path.with_name(f"part-{self.run_id}-{path.name.removeprefix('part-')}")
        return str(path)

    def _store(self, relpath: str, data: bytes) -> None:
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        _write_file(self.tmp / relpath, data)
        with self._lock:
            self._written.add(relpath)

    def _finish(self, action: str) -> None:
        if self._finished:
            raise OutputError(f"{action} after publish or discard", item=str(self.target))
        self._finished = True

    def _swap_in(self) -> None:
        old = _sibling(self.target, "old", self.run_id)
        had_old = self.target.exists()
        try:
            if had_old:
                os.rename(self.target, old)
            try:
                os.rename(self.tmp, self.target)
            except OSError:
                if had_old:
                    os.rename(old, self.target)
                raise
            durable.fsync_dir(self.target.parent)
        except OSError as e:
            raise OutputError(f"cannot publish: {e}", item=str(self.target)) from e
        if had_old:
            shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by clean_leftovers

    def _move_in(self, relpaths: list[str]) -> None:
        taken = [r for r in relpaths if (self.target / r).exists()]
        if taken:
            raise OutputError(
                f"append would overwrite {len(taken)} existing part(s), e.g. {taken[0]} "
                f"(run id {self.run_id!r} reused?)",
                item=str(self.target),
            )
        try:
            _write_file(self.tmp / APPEND_LIST, "\n".join(relpaths).encode())
            for relpath in relpaths:
                dest = self.target / relpath
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.tmp / relpath, dest)
            for folder in {(self.target / r).parent for r in relpaths}:
                durable.fsync_dir(folder)
            (self.tmp / APPEND_LIST).unlink()  # the commit point: nothing to take back now
        except OSError as e:
            try:
                _undo_append(self.target, self.tmp)
            except OSError as undo:  # the list stays; discard() or clean_leftovers retries
                log.warning("could not take back appended parts: %s", undo)
            raise OutputError(f"cannot append parts: {e}", item=str(self.target)) from e
        shutil.rmtree(self.tmp, ignore_errors=True)


def _sibling(target: Path, kind: str, run_id: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{run_id}"


def _files_under(folder: Path) -> set[str]:
    """Relpaths of the finished files in an adopted temp folder."""
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(".inprogress") and p.name != APPEND_LIST
    }  # fmt: skip


def _undo_append(target: Path, tmp: Path) -> None:
    """Take back the parts an interrupted append publish already moved into ``target``.

    Their names carry the run id, so whatever is found at a listed path is this run's.
    """
    listing = tmp / APPEND_LIST
    if not listing.exists():
        return
    for relpath in listing.read_text().splitlines():
        moved = target / relpath
        if moved.is_file():  # False too when a file blocks its folder: never moved
            moved.unlink()
        _prune_empty_dirs(moved.parent, stop=target)  # folders made for it, if now empty
    listing.unlink()


def _prune_empty_dirs(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): earlier output lives here
        folder = folder.parent


def _write_file(path: Path, data: bytes) -> None:
    try:
        durable.write_bytes(path, data)
    except OSError as e:
        raise OutputError(f"cannot write file: {e}", item=str(path)) from e

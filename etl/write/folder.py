"""The output folder: a private temp folder per run, then publishing.

Workers' pieces (Arrow IPC of a chunk's rows per partition, ``etl.core.parts``) are
spooled under ``_spool/`` in the temp folder, then cut into right-sized output files in
serial row order (``etl.write.files``); the spool is removed before publishing.
``write`` stores any other part's bytes as they are.

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
      (``part-<run_id>-00003.parquet``) so runs never collide; the writer adds it
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
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from etl.core import durable
from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.parts import (
    APPEND_LIST,
    INCOMING_DIR,
    PIECE_EXT,
    REJECTS_DIR,
    SPOOL_DIR,
    ipc_to_table,
    piece_key,
    with_run_id,
)
from etl.core.records import Part
from etl.write.files import FileCutter, Load

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


# --------------------------------------------------------------------------- writer


class OutputWriter:
    """Collects one run's parts in a temp folder and publishes them, or discards them."""

    def __init__(self, out: OutputConfig, run_id: str, adopt: Path | None = None) -> None:
        """``adopt``: a temp folder a dead run of this job left (see ``etl.run.state``); its
        files become this run's, so committed parts are not written again."""
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run_id must match {_RUN_ID.pattern}, got {run_id!r}")
        self.out = out
        self.run_id = run_id
        self.target = Path(out.path)
        self.tmp = adopt if adopt is not None else _sibling(self.target, "tmp", run_id)
        if adopt is not None:  # pieces the dead run's writer never took: their chunks run again
            shutil.rmtree(adopt / SPOOL_DIR / INCOMING_DIR, ignore_errors=True)
        self._written: set[str] = set() if adopt is None else _files_under(adopt)
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}  # rows of each piece spooled by ``write``: not mapped again to count them
        self._finished = False
        if self.target.exists() and not self.target.is_dir():
            raise OutputError("output path exists and is not a folder", item=str(self.target))
        try:
            self.tmp.mkdir(parents=True, exist_ok=adopt is not None)
        except OSError as e:
            raise OutputError(f"cannot create temp folder: {e}", item=str(self.tmp)) from e
        self.local = self.tmp  # where spooled pieces and files being written live
        self._start_cutter()

    def _start_cutter(self) -> None:
        """The file cutter, fed first with the pieces of an adopted temp folder's spool."""
        name = (lambda r: with_run_id(r, self.run_id)) if self.out.mode == "append" else (lambda r: r)
        self.cutter = FileCutter(self.out, self, name)
        # A dead run's output files were never committed (``etl.run.commits`` deletes them
        # before adopting); its committed pieces are cut into files again.
        chunks: dict[tuple[int, int], list[str]] = {}
        for relpath in sorted(r for r in self._written if r.startswith(f"{SPOOL_DIR}/")):
            _, source, chunk, _ = piece_key(relpath.removeprefix(f"{SPOOL_DIR}/"))
            chunks.setdefault((source, chunk), []).append(relpath)
        for (source, chunk), relpaths in sorted(chunks.items()):
            self.cutter.chunk_ready(source, chunk, [self._spooled(r) for r in relpaths])

    def incoming(self) -> Path:
        """The folder where workers on this machine write their pieces (``Part.file``,
        ``etl.core.parts.encode_parts``); ``write`` moves each into the spool."""
        return _made(self.local / SPOOL_DIR / INCOMING_DIR)

    def write(self, part: Part) -> str:
        """Write one part into the temp folder; returns its relpath there. A worker's piece
        (``.arrow``) goes to the spool, to be cut into output files once ``chunk_done``
        says its chunk is complete; any other part is stored as it is. Thread-safe;
        rewriting a part replaces it."""
        if part.relpath.endswith(f".{PIECE_EXT}"):
            piece_key(part.relpath)  # a ValueError for a name that is not a piece's
            relpath = f"{SPOOL_DIR}/{self._final_relpath(part.relpath, run_id=False)}"
            if part.file:
                self._move_from_worker(relpath, part.file)
            else:  # not fsynced, as the pieces workers write (etl.core.parts.write_ipc_file)
                self._store(relpath, part.data, sync=False)
            with self._lock:
                self._rows[relpath] = part.rows
            return relpath
        relpath = self._final_relpath(part.relpath)
        self._store(relpath, part.data)
        return relpath

    def chunk_done(self, source: int, chunk: int, spooled: list[str]) -> None:
        """Every piece of one chunk is spooled (``write``'s relpaths; none for a chunk with
        no rows): its rows may go into output files once the chunks before it have."""
        self.cutter.chunk_ready(source, chunk, [self._spooled(r) for r in sorted(spooled)])

    def admit(self, source: int) -> None:
        """``source`` is processed in this run: its chunks go into files as they come."""
        self.cutter.admit(source)

    def source_total(self, source: int, chunks: int) -> None:
        """``source`` has ``chunks`` chunks (0 when it is skipped or empty)."""
        self.cutter.source_total(source, chunks)

    def add_rows(self, source: int, files: list[tuple[Path, str, int, int]]) -> None:
        """Carry an unchanged source's rows over from published files, in its place in the
        serial order: (file, partition folder, first row, rows) per span."""
        pieces = [(folder, rows, _rows_of(path, start)) for path, folder, start, rows in files]
        self.cutter.chunk_ready(source, 0, pieces)
        self.cutter.source_total(source, 1)

    def finish_files(self) -> list[str]:
        """No more pieces: returns the partition folders to ``close_files`` (each once, in
        any order or in parallel) so every output file is written and closed."""
        return self.cutter.finish()

    def close_files(self, folder: str) -> None:
        self.cutter.close(folder)

    def files(self) -> list[tuple[str, int]]:
        """(relpath, rows) of the output files closed so far."""
        return self.cutter.files()

    def spans(self) -> dict[int, list[dict[str, Any]]]:
        """Where each source's rows are in the output files (see ``FileCutter.spans``)."""
        return self.cutter.spans()

    # FileSink: where the cutter's files go
    def open_file(self, relpath: str) -> BinaryIO:
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        path = self.tmp / f"{relpath}.inprogress"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "wb")
        except OSError as e:
            raise OutputError(f"cannot write file: {e}", item=str(path)) from e

    def wrote(self, f: BinaryIO) -> None:
        # The file is fsynced when it closes: sent to the disk as it grows, it has little
        # left to write then. The 6 files of 16M wide rows all close at the end of the run;
        # their fsyncs took 0.26-0.57 s of it, and 0.005 s with this.
        try:
            durable.start_writeback(f)
        except OSError as e:
            raise OutputError(f"cannot write file: {e}", item=getattr(f, "name", "?")) from e

    def close_file(self, relpath: str, f: BinaryIO, rows: int) -> None:
        try:
            durable.close_synced(f)
            os.replace(self.tmp / f"{relpath}.inprogress", self.tmp / relpath)
        except OSError as e:
            raise OutputError(f"cannot write file: {e}", item=str(self.tmp / relpath)) from e
        with self._lock:
            self._written.add(relpath)

    def _spooled(self, relpath: str) -> tuple[str, int, Load]:
        folder = piece_key(relpath.removeprefix(f"{SPOOL_DIR}/"))[0]
        path = self.local / relpath

        def load(start: int = 0, rows: int | None = None) -> pa.Table:
            # Zero-copy over the map: only the pages of the rows the caller keeps are read
            # (into RSS), and the map goes when the last slice of it is dropped.
            try:
                with pa.memory_map(str(path)) as m:
                    table = ipc_to_table(m.read_buffer())
            except (OSError, pa.ArrowException) as e:
                raise OutputError(f"cannot read a spooled chunk back: {e}", item=str(path)) from e
            return table.slice(start, rows)

        with self._lock:
            rows = self._rows.pop(relpath, None)
        return folder, load().num_rows if rows is None else rows, load  # an adopted piece: counted

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
        if relpath.startswith(f"{SPOOL_DIR}/"):
            self.cutter.forget(piece_key(relpath.removeprefix(f"{SPOOL_DIR}/"))[1])
        (self.tmp / relpath).unlink(missing_ok=True)
        with self._lock:
            self._written.discard(relpath)
            self._rows.pop(relpath, None)

    def publish(self) -> list[str]:
        """Make the run's output visible; returns the published relpaths, sorted.

        Call it once every part is written. On ``OutputError`` nothing was published
        (parts an append had moved are taken back); ``discard()`` then removes the rest.
        """
        self._finish("publish")
        if (self.tmp / SPOOL_DIR).exists():  # pieces are in the output files now
            shutil.rmtree(self.tmp / SPOOL_DIR, ignore_errors=True)
        relpaths = sorted(r for r in self._written if not r.startswith(f"{SPOOL_DIR}/"))
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
        self.cutter.abort()
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

    def _final_relpath(self, relpath: str, run_id: bool = True) -> str:
        path = PurePosixPath(relpath)
        if path.is_absolute() or ".." in path.parts or not path.name:
            raise OutputError("part path must be relative and stay inside the output folder", item=relpath)
        if self.out.mode == "append" and run_id:
            return with_run_id(str(path), self.run_id)
        return str(path)

    def _store(self, relpath: str, data: bytes, sync: bool = True) -> None:
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        _write_file(self.tmp / relpath, data, sync)
        with self._lock:
            self._written.add(relpath)

    def _move_from_worker(self, relpath: str, file: str) -> None:
        """Spool a piece a worker wrote in ``incoming``: a rename."""
        if self._finished:
            raise OutputError("write after publish or discard", item=relpath)
        try:
            (self.tmp / relpath).parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, self.tmp / relpath)
        except OSError as e:
            raise OutputError(f"cannot spool a chunk: {e}", item=file) from e
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


def _made(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create a folder: {e}", item=str(folder)) from e
    return folder


def _files_under(folder: Path) -> set[str]:
    """Relpaths of the finished files in an adopted temp folder."""
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not _unfinished(p.name) and p.name != APPEND_LIST
    }


def _unfinished(name: str) -> bool:
    """A temp file of ``durable`` (or of an older version of this tool) that was never renamed."""
    return name.endswith(".inprogress") or (name.startswith(".") and name.endswith(durable.TEMP_SUFFIX))


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


def _write_file(path: Path, data: bytes, sync: bool = True) -> None:
    try:
        durable.write_bytes(path, data, sync=sync)
    except OSError as e:
        raise OutputError(f"cannot write file: {e}", item=str(path)) from e


def _rows_of(path: Path, span_start: int) -> Load:
    """Loads rows of a published Parquet file's span that starts at row ``span_start``
    (``load(start, rows)``: relative to the span), reading only the row groups that hold
    them."""

    def load(offset: int, rows: int) -> pa.Table:
        start = span_start + offset
        try:
            f = pq.ParquetFile(path)
            groups, first, at = [], None, 0
            for i in range(f.metadata.num_row_groups):
                n = f.metadata.row_group(i).num_rows
                if at + n > start and at < start + rows:
                    groups.append(i)
                    first = at if first is None else first
                at += n
            table = f.read_row_groups(groups)
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"cannot read rows to carry over: {e}", item=str(path)) from e
        return table.slice(start - (first or 0), rows)

    return load

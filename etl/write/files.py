"""Right-sized output files: the workers' pieces cut into files in serial row order.

Workers hand over each chunk's rows per partition folder as Arrow IPC pieces
(``etl.core.parts.encode_parts``), written as files into the writer's ``_spool/_incoming/``
(or as bytes from a Dask worker); the writer moves (or writes) every piece into its spool
(the run's temp folder, ``_spool/``) and registers the chunk here (``chunk_ready``). A ``FileCutter``
feeds the pieces into per-partition output files **in serial order** (source, chunk,
halves), whatever order the chunks arrive in, so every boundary depends only on the rows
and the config:

* a row group is exactly ``output.row_group_size`` rows of one partition (the last one of
  a file may be shorter);
* a file closes at the first row-group boundary where its size reaches
  ``output.target_file_size``, or when its partition ends;
* so every file holds at least a quarter of the target except the last of a partition
  (or a whole partition that small), and an evicted one (below).

The cursor waits at a source until its chunk count is known (``source_total``) and every
chunk up to it has arrived; chunks that arrive early wait on disk (their spool files),
not in memory. ``finish`` feeds what is left and closes every file.

Encoding stays parallel: feeding (slicing tables, under one lock) is cheap; each row group
it cuts is queued on its partition, and the writer thread that fed it encodes it outside
that lock, holding only the partition's lock, so partitions encode on several writer
threads at once and beside the transform workers (pyarrow's Parquet and CSV writers
release the GIL). A partition's jobs are queued in serial order and run in that order.

Memory: an open file's buffered rows (fewer than ``row_group_size``) and the row groups
queued for encoding are held as *segments* (a piece's load and a row range), not as
tables: the rows stay on disk, in the spool, until the writer thread that encodes a row
group loads them (``load(start, rows)``, a memory map) and drops them once it is written.
So the cutter holds one row group per writer thread while it encodes (its rows plus the
Parquet writer's ~20-30 MiB of buffers), whatever the number of open files. Measured on
the 300 MiB test job (6 partitions, 2M rows, thread executor): buffers held as tables
(6 x a 131,072-row group, ~100 MiB, mapped spool pages) peaked the tree at 410-480 MiB;
as segments, 320-330 MiB, the rest being one row group's encode (~50 MiB) on top of the
run's fixed cost. At most
``MAX_OPEN_FILES`` files are open: feeding a new partition beyond that closes the
partition fed least recently. Only with more partitions than that interleaved in the
input does the rule bend: those files may be smaller than a quarter of the target, and
since "least recently fed" is counted in chunks, their boundaries then depend on the
chunk size (never on the arrival order or the executor: feeding is in serial order).

Resume (trade-off): a spool of every committed chunk, kept until publish, costs disk (the
uncompressed Arrow size of the run's rows, in the temp folder) and one extra write of each
row, but makes resume after kill -9 trivial: output files are never committed, only
pieces are; a resumed run deletes the dead run's output files and cuts them again from the
adopted spool. The alternative, dropping each piece once the files holding its rows are
durable and committing output files with row offsets, saves the disk but makes the
manifest track rows per file and the resume split files mid-way.
Carrying over an unchanged source (overwrite mode) reads its rows back from the published
files, where ``spans`` recorded them (file, first row, rows), and feeds them in its place.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.parts import ROW_GROUP_MAX_BYTES, file_name

# A column keeps Parquet dictionary encoding when its file's first row group has at most this
# many distinct values per row: above it the dictionary overflows or costs more than it saves.
DICTIONARY_MAX_DISTINCT = 0.5
# A column whose first this-many rows have more than this share of distinct values skips the
# dictionary without counting the whole row group: a larger probe judges more columns exactly,
# at more hashing (16,384 rows from 5x that many values are ~90% distinct).
DISTINCT_PROBE_ROWS = 16_384
DISTINCT_PROBE_SHARE = 0.9
# Files open at once: more lets more partitions interleave without closing files early;
# each costs a file handle and a Parquet writer's metadata (its buffered rows stay on disk).
MAX_OPEN_FILES = 32

Load = Callable[[int, int], pa.Table]
"""``load(start, rows)``: rows ``start`` to ``start + rows`` of one piece (a spool file
mapped back, or rows of a published file); called when a row group is encoded."""


class FileSink(Protocol):
    """Where output files go (the folder or object-store writer)."""

    def open_file(self, relpath: str) -> BinaryIO: ...

    def wrote(self, f: BinaryIO) -> None:
        """A row group went into ``f`` (a file ``open_file`` gave)."""

    def close_file(self, relpath: str, f: BinaryIO, rows: int) -> None: ...


@dataclass
class _Piece:
    folder: str
    rows: int
    load: Load
    source: int


@dataclass
class _Segment:
    """Rows ``start`` to ``start + rows`` of a piece, not loaded until encoded."""

    load: Load
    start: int
    rows: int


@dataclass
class _Job:
    """A row group to encode (``segments``) or, with ``segments`` None, the file to close."""

    segments: list[_Segment] | None
    sources: list[tuple[int, int]] = field(default_factory=list)
    """(source index, rows) of the rows in ``segments``, in order."""


@dataclass
class _Partition:
    folder: str
    buffer: deque[_Segment] = field(default_factory=deque)
    buffered: int = 0
    sources: list[tuple[int, int]] = field(default_factory=list)
    jobs: deque[_Job] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # encoding state, under ``lock``
    number: int = 0
    writer: Any = None
    schema: pa.Schema | None = None
    file: BinaryIO | None = None
    relpath: str = ""
    rows_in_file: int = 0


class FileCutter:
    """Cuts one run's output files (see the module docstring). Thread-safe."""

    def __init__(self, out: OutputConfig, sink: FileSink, name: Callable[[str], str] = lambda r: r) -> None:
        """``name`` maps a file's relpath to its final one (append mode adds the run id)."""
        self.out = out
        self.sink = sink
        self.name = name
        self._lock = threading.Lock()
        self._ready: dict[tuple[int, int], list[_Piece]] = {}
        self._totals: dict[int, int] = {}
        self._admitted: set[int] = set()  # sources whose chunks may be fed before their count is known
        self._pos = (0, 0)
        self._parts: OrderedDict[str, _Partition] = OrderedDict()  # open partitions, least recent first
        self._every: dict[str, _Partition] = {}  # every partition fed so far
        self._numbers: dict[str, int] = {}  # files begun per folder
        self._spans: dict[int, list[dict[str, Any]]] = {}
        self._spans_lock = threading.Lock()
        self._files: list[tuple[str, int]] = []  # (relpath, rows) of closed files
        self._failed: BaseException | None = None

    # ------------------------------------------------------------------ feeding

    def chunk_ready(self, source: int, chunk: int, pieces: list[tuple[str, int, Load]]) -> None:
        """Chunk ``chunk`` of ``source`` is spooled: ``(folder, rows, load)`` per piece, in
        serial order (halves sorted); ``rows`` is the piece's row count. Feeds what is now
        in order and encodes it."""
        with self._lock:
            self._ready[(source, chunk)] = [_Piece(f, n, load, source) for f, n, load in pieces]
            touched = self._advance()
        self._encode(touched)

    def admit(self, source: int) -> None:
        """``source`` is being processed: its chunks may go into files as they come. Until a
        source is admitted or its count is known, its chunks wait (an adopted source may
        still turn out changed and be forgotten)."""
        with self._lock:
            self._admitted.add(source)
            touched = self._advance()
        self._encode(touched)

    def forget(self, source: int) -> None:
        """Drop a source's registered chunks (an adopted source that changed since)."""
        with self._lock:
            for key in [k for k in self._ready if k[0] == source]:
                del self._ready[key]
            self._totals.pop(source, None)

    def source_total(self, source: int, chunks: int) -> None:
        """``source`` has ``chunks`` chunks (0 for a source with no rows, or skipped)."""
        with self._lock:
            self._totals[source] = chunks
            touched = self._advance()
        self._encode(touched)

    def finish(self) -> list[str]:
        """Feed every chunk still waiting, in serial order, and close every file; returns the
        folders whose last jobs are queued: ``close(folder)`` each (in parallel if you like)."""
        with self._lock:
            for key in sorted(self._ready):
                self._feed(self._ready.pop(key))
            for folder in self._parts:
                self._close_later(folder)
            self._parts.clear()
            return sorted(self._every)

    def close(self, folder: str) -> None:
        """Run ``folder``'s queued jobs (after ``finish``)."""
        self._run_jobs(self._every.get(folder))

    def files(self) -> list[tuple[str, int]]:
        """(relpath, rows) of every file closed so far, sorted."""
        with self._spans_lock:
            return sorted(self._files)

    def spans(self) -> dict[int, list[dict[str, Any]]]:
        """Per source index: where its rows are, in order: ``{"path", "start", "rows"}``."""
        with self._spans_lock:
            return {s: [dict(x) for x in v] for s, v in self._spans.items()}

    def abort(self) -> None:
        """Close open files without publishing them (a failed run). Never raises."""
        for p in list(self._every.values()):
            with p.lock:
                p.jobs.clear()
                if p.file is not None:
                    try:  # the footer goes into the .inprogress file, which is then removed
                        p.writer.close()
                    except (pa.ArrowException, OSError, ValueError):
                        pass
                    try:
                        p.file.close()
                    except OSError:
                        pass
                    p.file, p.writer = None, None

    # ---------------------------------------------------------------- internals

    def _advance(self) -> list[_Partition]:
        """Caller holds ``_lock``: feed every chunk that is next in serial order."""
        touched: list[_Partition] = []
        while True:
            source, chunk = self._pos
            total = self._totals.get(source)
            if total is not None and chunk >= total:
                self._pos = (source + 1, 0)
                continue
            if total is None and source not in self._admitted:
                return touched
            pieces = self._ready.pop((source, chunk), None)
            if pieces is None:
                return touched
            touched += self._feed(pieces)
            self._pos = (source, chunk + 1)

    def _feed(self, pieces: list[_Piece]) -> list[_Partition]:
        """Caller holds ``_lock``: append pieces to their partitions' buffers, cutting row groups."""
        touched: list[_Partition] = []
        rgs = self.out.row_group_size
        for piece in pieces:
            if piece.rows == 0:
                continue
            p = self._open(piece.folder, touched)
            p.buffer.append(_Segment(piece.load, 0, piece.rows))
            p.buffered += piece.rows
            p.sources.append((piece.source, piece.rows))
            while p.buffered >= rgs:
                p.jobs.append(self._cut(p, rgs))
            touched.append(p)
        return touched

    def _open(self, folder: str, touched: list[_Partition]) -> _Partition:
        p = self._parts.get(folder)
        if p is not None:
            self._parts.move_to_end(folder)
            return p
        if len(self._parts) >= MAX_OPEN_FILES:
            oldest, _ = self._parts.popitem(last=False)
            self._close_later(oldest)
            touched.append(self._every[oldest])
        p = self._every.get(folder)
        if p is None:
            p = self._every[folder] = _Partition(folder)
        self._parts[folder] = p
        return p

    def _close_later(self, folder: str) -> None:
        p = self._every[folder]
        if p.buffered:
            p.jobs.append(self._cut(p, p.buffered))
        p.jobs.append(_Job(None))

    @staticmethod
    def _cut(p: _Partition, rows: int) -> _Job:
        """The first ``rows`` buffered rows as one row-group job (segments, not loaded)."""
        head: list[_Segment] = []
        left = rows
        while left:
            seg = p.buffer[0]
            if seg.rows <= left:
                head.append(p.buffer.popleft())
                left -= seg.rows
            else:
                head.append(_Segment(seg.load, seg.start, left))
                p.buffer[0] = _Segment(seg.load, seg.start + left, seg.rows - left)
                left = 0
        p.buffered -= rows
        sources, left = [], rows
        while left:
            s, n = p.sources[0]
            take = min(n, left)
            sources.append((s, take))
            left -= take
            if take == n:
                p.sources.pop(0)
            else:
                p.sources[0] = (s, n - take)
        return _Job(head, sources)

    def _encode(self, touched: list[_Partition]) -> None:
        """Run queued row-group jobs: the partitions this thread fed first, then any other
        partition's, skipping a partition another thread is encoding (it drains that
        partition's jobs, new ones included, and then looks again). So a burst, such as a
        source's chunks that waited for the one before it and arrive all at once, is
        encoded on every writer thread instead of the one that fed it; a job waits as
        segments (its rows on disk), not in memory."""
        first = list({p.folder: p for p in touched}.values())
        while True:
            ran = False
            for p in first + list(self._every.values()):
                if p.jobs and p.lock.acquire(blocking=False):
                    try:
                        self._drain(p)
                    finally:
                        p.lock.release()
                    ran = True
            if not ran:
                return

    def _run_jobs(self, p: _Partition | None) -> None:
        if p is None:
            return
        with p.lock:
            self._drain(p)

    def _drain(self, p: _Partition) -> None:
        """Caller holds ``p.lock``: run the partition's jobs, in order, until none is left."""
        while p.jobs:
            job = p.jobs.popleft()
            if job.segments is None:
                self._close_file(p)
            else:
                self._write(p, job)

    def _write(self, p: _Partition, job: _Job) -> None:
        assert job.segments is not None
        for group in _groups_within_bytes(job.segments, ROW_GROUP_MAX_BYTES):
            self._write_group(p, group)
        assert p.file is not None
        self.sink.wrote(p.file)
        # The encoder's buffers (~20-30 MiB, measured) go back to the OS now: the allocator
        # (mimalloc) otherwise keeps them in this thread's heap while it waits for the next result
        pa.default_memory_pool().release_unused()
        with self._spans_lock:
            for s, n in job.sources:
                spans = self._spans.setdefault(s, [])
                if (
                    spans
                    and spans[-1]["path"] == p.relpath
                    and spans[-1]["start"] + spans[-1]["rows"] == p.rows_in_file
                ):
                    spans[-1]["rows"] += n
                else:
                    spans.append({"path": p.relpath, "start": p.rows_in_file, "rows": n})
                p.rows_in_file += n
        if p.file.tell() >= self.out.target_file_size:
            self._close_file(p)

    def _write_group(self, p: _Partition, tables: list[pa.Table]) -> None:
        """Encode ``tables`` (consecutive rows) as one row group of the partition's file."""
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        tables.clear()
        if p.file is None:
            self._begin_file(p, table)
        if not table.schema.equals(p.schema, check_metadata=False):
            table = _conform(table, p.schema, p.relpath)
        table = _dictionaries_by_rows(table)
        try:
            p.writer.write_table(table, **({"row_group_size": table.num_rows} if self._parquet else {}))
        except (pa.ArrowException, OSError) as e:
            raise OutputError(f"cannot write {self.out.format}: {e}", item=p.relpath) from e
        del table

    @property
    def _parquet(self) -> bool:
        return self.out.format == "parquet"

    def _begin_file(self, p: _Partition, first: pa.Table) -> None:
        """Open the partition's next file for ``first``, its first row group."""
        schema = first.schema
        number = self._numbers.get(p.folder, 0)
        self._numbers[p.folder] = number + 1
        name = file_name(number, self.out.format)
        p.relpath = self.name(f"{p.folder}/{name}" if p.folder else name)
        p.file = self.sink.open_file(p.relpath)
        p.rows_in_file = 0
        p.schema = schema
        try:
            if self._parquet:
                codec = None if self.out.compression == "none" else self.out.compression
                p.writer = pq.ParquetWriter(p.file, schema, compression=codec, use_dictionary=dictionary_columns(first))
            else:
                p.writer = pacsv.CSVWriter(p.file, schema, write_options=pacsv.WriteOptions(include_header=True))
        except (pa.ArrowException, OSError) as e:
            raise OutputError(f"cannot write {self.out.format}: {e}", item=p.relpath) from e

    def _close_file(self, p: _Partition) -> None:
        if p.file is None:
            return
        try:
            p.writer.close()
        except (pa.ArrowException, OSError) as e:
            raise OutputError(f"cannot write {self.out.format}: {e}", item=p.relpath) from e
        f, p.file, p.writer = p.file, None, None
        self.sink.close_file(p.relpath, f, p.rows_in_file)
        with self._spans_lock:
            self._files.append((p.relpath, p.rows_in_file))


def dictionary_columns(first: pa.Table) -> bool | list[str]:
    """The columns a Parquet file dictionary-encodes, judged on its first row group: those
    with at most ``DICTIONARY_MAX_DISTINCT`` distinct values per row.

    Arrow's writer tries a dictionary for every column and falls back to plain pages once
    the dictionary passes 1 MiB: for an id, a timestamp or a computed amount it hashes every
    value for nothing. Measured per column on both benchmark jobs' output (131,072-row
    groups, zstd): columns with 0.6-1.0 distinct values per row encode 2-4x faster and
    10-60% smaller as plain pages; those with few (fares, codes, names) are faster and
    smaller with a dictionary. The first row group depends only on the rows and the
    config, so the choice (and the file) does not depend on chunk boundaries. Nested and
    dictionary-typed columns keep the writer's default (a dictionary).

    Counting is hashing, about what the dictionary would have cost on that row group, so a
    column is judged on its first ``DISTINCT_PROBE_ROWS`` rows when they settle it: nearly
    all distinct (drawn from few values, that many rows would repeat some), or already
    at most ``DICTIONARY_MAX_DISTINCT`` (a longer run of rows has no larger share of new
    values, unless the column changes character after its head). Only the columns in
    between are counted over the whole row group: on the taxi job's output, one of 14."""
    if first.num_rows == 0 or any(pa.types.is_nested(f.type) for f in first.schema):
        return True
    names = []
    for name, column in zip(first.column_names, first.columns):
        if pa.types.is_dictionary(column.type) or _few_distinct(column):
            names.append(name)
    return names


def _few_distinct(column: pa.ChunkedArray) -> bool:
    head = column.slice(0, DISTINCT_PROBE_ROWS)
    if len(head) < len(column):
        seen = _distinct(head)
        if seen > DISTINCT_PROBE_SHARE * len(head):
            return False
        if seen <= DICTIONARY_MAX_DISTINCT * len(head):
            return True  # more rows mostly repeat what the head holds: the share only falls
    return _distinct(column) <= DICTIONARY_MAX_DISTINCT * len(column)


def _distinct(column: pa.ChunkedArray) -> int:
    return int(pc.count_distinct(column, mode="all").as_py())


def _conform(table: pa.Table, schema: pa.Schema, relpath: str) -> pa.Table:
    """Rows whose types differ from the file's first rows (e.g. a column all null in one
    chunk), cast to the file's schema; an OutputError naming the file when they cannot be."""
    if table.column_names != schema.names:
        raise OutputError(
            f"rows with columns {table.column_names} cannot go into a file with columns {schema.names}",
            item=relpath,
        )
    try:
        return table.cast(schema)
    except (pa.ArrowException, ValueError) as e:
        raise OutputError(f"rows whose types differ from the file's earlier rows: {e}", item=relpath) from e


def _dictionaries_by_rows(table: pa.Table) -> pa.Table:
    """Dictionary (categorical) columns re-encoded over the row group's rows: each chunk
    brings its own dictionary, and the Parquet writer's output would depend on where
    chunks began; values in order of first appearance depend only on the rows."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            dense = table.column(i).cast(f.type.value_type).combine_chunks()
            table = table.set_column(i, f, pc.dictionary_encode(dense).cast(f.type))
    return table


def _groups_within_bytes(segments: list[_Segment], limit: int) -> Iterator[list[pa.Table]]:
    """A row-group job's rows, loaded one segment at a time, as consecutive groups of at
    most ``limit`` bytes (``row_bytes``; a single row larger than that is a group of its
    own). Cuts depend only on the rows, never on where segments begin, so the output stays
    the same whatever the chunk size. Rows are measured only once the loaded segments'
    ``nbytes`` (never less than ``row_bytes``) passes the limit: usual rows never are."""
    pending: list[pa.Table] = []
    loose = 0  # nbytes of pending: an upper bound of its row_bytes
    for seg in segments:
        pending.append(seg.load(seg.start, seg.rows))
        loose += pending[-1].nbytes
        if loose <= limit:
            continue
        table = pa.concat_tables(pending, promote_options="permissive")
        pending = []
        sizes = np.cumsum(row_bytes(table))
        start, base = 0, 0
        while start < table.num_rows:
            end = int(np.searchsorted(sizes, base + limit, side="right"))
            if end == table.num_rows:  # the rest may still grow with the next segment
                break
            end = max(end, start + 1)
            yield [table.slice(start, end - start)]
            base, start = int(sizes[end - 1]), end
        if start < table.num_rows:
            pending = [table.slice(start)]
            loose = int(sizes[-1]) - base
        else:
            loose = 0
    if pending:
        yield pending


def row_bytes(table: pa.Table) -> np.ndarray:
    """Bytes of each row: fixed-width values, string and binary lengths plus a 4-byte
    offset, dictionary indices, a column of any other type at its average per row; never
    more in sum than the table's ``nbytes`` (booleans count nothing)."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        t = column.type
        if pa.types.is_dictionary(t):
            total += t.index_type.bit_width // 8
        elif (
            pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t)
        ):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            total += lengths.to_numpy(zero_copy_only=False).astype(np.int64) + 4
        elif pa.types.is_boolean(t):
            continue  # a bit each: counted as nothing, so the sum stays below nbytes
        else:
            try:
                total += t.bit_width // 8
            except ValueError:  # nested or variable types: their share, spread evenly
                total += column.nbytes // max(table.num_rows, 1)
    return total

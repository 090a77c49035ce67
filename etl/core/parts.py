"""Output parts: their names and their bytes, the contract between workers and the writer.

Workers encode (``encode_parts``, ``encode_rejects``): a transformed chunk becomes ``Part``
records, one per partition folder, each the chunk's rows of that partition as Arrow IPC
(a stream, uncompressed: cheap to write and to map back) under a path relative to the
output folder. The write stage spools those pieces and cuts the output files from them in
serial row order (``etl.write.files``): file and row-group boundaries depend only on the
rows and the config, never on chunk boundaries.

Names (every rule in one place)::

    [col=value/...]part-<source:05d>-<chunk:06d>[-h<half path>].arrow   a chunk's piece
    [col=value/...]part-<file:05d>.<parquet|csv>                         an output file
    _rejected/rejected-<source:05d>-<chunk:06d>.jsonl
    _spool/_incoming/<random>.arrow     a worker's piece, until the writer moves it into _spool/

Sorting a folder's pieces gives the serial row order: source, then chunk, then the halves
of a chunk that was split after its worker was killed (``split_name``); sorting its output
files gives the same order. In append mode the writer inserts the run id after ``part-``
(``with_run_id``) so runs never collide; a resumed run renumbers pieces and dead-letter
files whose source moved in the list (``renumbered``).

Partition folders follow Hive: ``col=value`` in the order of ``output.partition_by``,
values percent-encoded as Hive does, null and "" as ``HIVE_NULL``; partition columns are
left out of the files, as pyarrow and Spark do.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.records import Chunk, Part

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Characters Hive percent-encodes in partition folder names (FileUtils.escapePathName).
_HIVE_UNSAFE = frozenset(chr(c) for c in range(0x20)) | set("\"#%'*/:=?\\\x7f{[]^")
_MAX_NAME_BYTES = 255  # longest file or folder name on common filesystems
REJECTS_DIR = "_rejected"  # readers (pyarrow, Spark) skip folders starting with "_"
SPOOL_DIR = "_spool"  # in a run's temp folder: the workers' pieces, until publish
INCOMING_DIR = "_incoming"  # in the spool: pieces workers wrote, until the writer moves them in
APPEND_LIST = ".append-parts"  # in a run's temp folder: the parts an append publish is moving
_INDEXED_NAME = re.compile(r"^(part|rejected)-\d{5}-")
# Most bytes of rows in one row group (values, plus 4 offset bytes per string): a row group of
# very wide rows (131,072 rows of 20 KB is 2.6 GB) is cut sooner, at a row where this is
# reached, so encoding holds at most this much plus one spooled piece. Larger groups read
# faster; this is about 4 times the rows of a typical 131,072-row group of 100-byte rows.
ROW_GROUP_MAX_BYTES = 64 << 20
PIECE_EXT = "arrow"  # a chunk's rows of one partition, as the workers hand them over
_PIECE_NAME = re.compile(r"^part-(\d{5})-(\d{6})((?:-h[01]+)?)\.arrow$")


# --------------------------------------------------------------------------- names


def part_name(source_index: int, chunk_index: int, ext: str = "") -> str:
    """``part-00001-000003.arrow``: a chunk's piece in one partition folder."""
    return f"part-{source_index:05d}-{chunk_index:06d}.{ext or PIECE_EXT}"


def file_name(number: int, ext: str) -> str:
    """``part-00002.parquet``: a partition folder's third output file."""
    return f"part-{number:05d}.{ext}"


def piece_key(relpath: str) -> tuple[str, int, int, str]:
    """``m=1/part-00001-000003-h01.arrow`` → ``("m=1", 1, 3, "-h01")``: folder, source,
    chunk and half path of a worker's piece (see ``part_name``, ``split_name``)."""
    folder, _, name = relpath.rpartition("/")
    m = _PIECE_NAME.match(name)
    if m is None:
        raise ValueError(f"not a piece name: {relpath!r}")
    return folder, int(m.group(1)), int(m.group(2)), m.group(3)


def with_run_id(relpath: str, run_id: str) -> str:
    """``m=1/part-00001-000003.parquet`` → ``m=1/part-<run_id>-00001-000003.parquet`` (append)."""
    folder, slash, name = relpath.rpartition("/")
    return f"{folder}{slash}part-{run_id}-{name.removeprefix('part-')}"


def split_name(relpath: str, path: str) -> str:
    """``m=1/part-00001-000003.parquet`` + "01" → ``m=1/part-00001-000003-h01.parquet``."""
    folder, slash, name = relpath.rpartition("/")
    stem, dot, ext = name.partition(".")
    return f"{folder}{slash}{stem}-h{path}{dot}{ext}"


def renumbered(relpath: str, index: int) -> str:
    """``m=1/part-00003-000000.parquet`` for source index 5 → ``m=1/part-00005-000000.parquet``."""
    folder, _, name = relpath.rpartition("/")
    name = _INDEXED_NAME.sub(lambda m: f"{m.group(1)}-{index:05d}-", name)
    return f"{folder}/{name}" if folder else name


# ------------------------------------------------------------------------ encoding


def encode_parts(
    df: pd.DataFrame,
    out: OutputConfig,
    *,
    source_index: int,
    chunk_index: int,
    label: str = "",
    spool: Path | None = None,
) -> list[Part]:
    """One transformed chunk as pieces for the writer (Arrow IPC, one per partition
    folder); an empty frame gives none.

    With ``spool`` (the writer's ``incoming`` folder, on this machine) each piece is
    written there as a file and the ``Part`` only names it: the rows then never travel
    through the worker's pipe and the parent's memory, and the writer moves the file into
    its spool (``Part.file``). Without it (a Dask worker, maybe on another machine) the
    bytes travel in ``Part.data``.

    With ``out.partition_by``, rows go to hive folders (``col=value/``, in the order
    given, values percent-encoded as Hive does, null and "" as ``HIVE_NULL``) and the
    partition columns are left out, as pyarrow and Spark do. Rows keep the chunk's order.
    ``label`` names the chunk in errors (pass ``Chunk.label``).
    """
    label = label or f"source {source_index}[chunk {chunk_index}]"
    if len(df) == 0:
        return []
    table = _to_arrow(df, label)
    name = part_name(source_index, chunk_index)
    if not out.partition_by:
        return [_piece(name, table, spool)]
    _check_partition_columns(table, out.partition_by, label)
    parts = []
    for folder, rows in _partitions(table, out.partition_by, label):
        parts.append(_piece(f"{folder}/{name}", _rows(table, rows).drop_columns(out.partition_by), spool))
    return parts


def _rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table``'s rows ``rows`` (ascending): a zero-copy slice when they are one run, as
    they mostly are when the input is ordered by what it is partitioned by (a date), else
    a copy (``take``)."""
    if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):
        return table.slice(int(rows[0]), len(rows))
    return table.take(rows)


def _piece(relpath: str, table: pa.Table, spool: Path | None) -> Part:
    if spool is None:
        return Part(relpath, table_to_ipc(table), table.num_rows)
    path = spool / f"{uuid.uuid4().hex}.{PIECE_EXT}"  # unique: a retried chunk never meets its first try
    try:
        size = write_ipc_file(table, path)
    except OSError as e:
        raise OutputError(f"cannot spool a chunk's rows: {e}", item=str(path)) from e
    return Part(relpath, b"", table.num_rows, file=str(path), size=size)


def write_ipc_file(table: pa.Table, path: Path) -> int:
    """``table`` written to ``path`` as ``table_to_ipc`` would encode it; returns the bytes
    written. Not fsynced: a spooled piece only has to outlive this process (the page cache
    keeps it through a kill -9), and one fsync per piece kept the disk busy with rows that
    are deleted at publish (16M rows: ~2,000 fsyncs, 5 s of the workers' time, 12% of the
    run's wall). After an OS crash, a resumed run checks each piece against the manifest
    (``piece_is_whole``) and runs the source again when one did not reach the disk."""
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as stream:
            stream.write_table(table)
        return cast(int, sink.tell())


def piece_is_whole(path: Path, rows: int, size: int) -> bool:
    """Whether a spooled piece is the one the manifest committed: ``size`` bytes of a
    readable Arrow IPC stream of ``rows`` rows (a piece lost or cut short by an OS crash is
    missing, shorter, or zeros, which do not read as a stream). Reads the message headers
    over a memory map, not the rows."""
    try:
        if path.stat().st_size != size:
            return False
        with pa.memory_map(str(path)) as m:
            return cast(int, ipc_to_table(m.read_buffer()).num_rows) == rows
    except (OSError, pa.ArrowException):
        return False


def table_to_ipc(table: pa.Table) -> bytes:
    """A table as an Arrow IPC stream (uncompressed: a memcpy, and mapped back for free)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return cast(bytes, sink.getvalue().to_pybytes())


def ipc_to_table(data: pa.Buffer | bytes) -> pa.Table:
    """The table ``table_to_ipc`` wrote (zero-copy over a memory-mapped buffer)."""
    return pa.ipc.open_stream(data).read_all()


def _to_arrow(df: pd.DataFrame, label: str) -> pa.Table:
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise OutputError(f"cannot convert the chunk to Arrow for writing: {e}", item=label) from e


def _check_partition_columns(table: pa.Table, columns: list[str], label: str) -> None:
    for column in columns:
        if column.startswith((".", "_")):
            raise OutputError(
                f"output.partition_by names column {column!r}: folders starting with "
                f"{column[0]!r} are hidden files to readers (pyarrow, Spark skip them); "
                "rename the column first (a rename step)",
                item=label,
            )
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


def _partitions(table: pa.Table, columns: list[str], label: str) -> Iterator[tuple[str, np.ndarray]]:
    """(hive folder, row indices in chunk order) per folder, in order of first appearance.

    Keys are grouped by folder name, not by value: null and "" (or 1 and "1" in a mixed
    column) share a folder and must share one part file.
    """
    # Positional key names: pyarrow reads a name like ".b" or "a.b" as a path into a struct.
    keys = [f"k{i}" for i in range(len(columns))]
    keyed = pa.table([table.column(c) for c in columns] + [pa.arange(0, table.num_rows)], names=[*keys, "__row"])
    groups = keyed.group_by(keys, use_threads=False).aggregate([("__row", "list")])
    rows = groups.column("__row_list")
    folders: dict[str, list[np.ndarray]] = {}
    for i, key in enumerate(groups.select(keys).to_pylist()):
        folder = "/".join(_hive_segment(c, key[k], label) for c, k in zip(columns, keys))
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


def encode_table(table: pa.Table, out: OutputConfig) -> bytes:
    """The bytes of one output file: Parquet with ``out.compression`` (``none``:
    uncompressed), or CSV (UTF-8, header row, nulls as empty fields)."""
    sink = pa.BufferOutputStream()
    if out.format == "parquet":
        codec = None if out.compression == "none" else out.compression
        pq.write_table(table, sink, compression=codec)
    else:
        pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(include_header=True))
    return cast(bytes, sink.getvalue().to_pybytes())


def encode_rejects(rejects: pd.DataFrame, chunk: Chunk) -> Part:
    """Dead-letter rows as JSON Lines: source, row (or the file line, see ``Chunk.unit``),
    step, reason and the raw input row."""
    lines = [
        json.dumps(
            {
                "source": chunk.source_name,
                chunk.unit: int(r["_row"]),
                "step": r["_step"],
                "reason": r["_reason"],
                "raw": json.loads(r["_raw"]) if r["_raw"] else None,
            }
        )
        for r in rejects.to_dict("records")
    ]
    data = ("\n".join(lines) + "\n").encode()
    return Part(rejects_name(chunk), data, len(lines))


def rejects_name(chunk: Chunk) -> str:
    """``rejected-<source>-<chunk>.jsonl``: the chunk's dead-letter file under ``REJECTS_DIR``."""
    return f"rejected-{chunk.source_index:05d}-{chunk.index:06d}.jsonl"

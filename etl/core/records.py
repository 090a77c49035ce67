"""The plain records that travel between stages (and across the process boundary).

Nothing here holds a live resource: no session, no open file, no DataFrame. A ``Chunk``
carries its rows as Arrow IPC stream bytes or raw CSV text and a ``ChunkResult`` carries encoded output
files, so both pickle as a few large ``bytes`` objects and cost a memcpy to send.

Every record knows its identity (source, chunk index, row range) so that every error,
retry and rejected row can name where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Format = Literal["csv", "jsonl", "parquet"]
ChunkKind = Literal["arrow", "csv"]


@dataclass(frozen=True, slots=True)
class Source:
    """One input file, after globs, ranges and listing files have been expanded."""

    index: int
    """Position in the expanded source list; orders output parts deterministically."""
    url: str
    """``http(s)://`` URL, or an absolute local path."""
    name: str
    """File name, unique within the job (``trips-003.csv.gz``)."""
    format: Format
    sha256: str | None = None
    md5: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_remote(self) -> bool:
        return self.url.startswith(("http://", "https://"))


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A source whose bytes are complete on local disk (verified when a checksum is set)."""

    source: Source
    path: Path
    size: int
    unchanged: bool = False
    """The server answered 304: same content as the previous run's."""
    sha256: str | None = None
    """The content's sha256 when the download stage already hashed it (every fetched file,
    and a 304's remembered copy), so the run's bookkeeping does not read the file again."""

    @property
    def nbytes(self) -> int:
        return 0  # only a path travels; the bytes stay on disk


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive rows of one source: an Arrow IPC stream, or raw CSV records.

    ``kind = "arrow"``: ``data`` is an Arrow IPC stream (parsed by a reader thread);
    ``row_start`` is the 0-based data row of its first row and ``rows`` its row count.
    ``kind = "csv"``: ``data`` is whole CSV records, without the header, that the worker
    parses (``etl.read.csv_cut``); ``row_start`` is the 1-based file line where its first
    record starts and ``rows`` the lines it spans (its records, unless values hold
    newlines). Rows are then named by file line in every error and dead-letter record.
    """

    source_index: int
    source_name: str
    index: int
    """0-based chunk number within the source."""
    row_start: int
    rows: int
    data: bytes | bytearray = field(repr=False)
    kind: ChunkKind = "arrow"
    columns: tuple[str, ...] = ()
    """``csv`` chunks: the column names from the file's header."""
    source_bytes: int = 0
    """Bytes of the file as stored (compressed ones: compressed bytes) that the reader
    consumed for this chunk; a file's chunks sum to its size. The read and transform
    progress bars count them. Halves of a split chunk carry 0: the chunk is counted once."""
    set_aside: tuple[tuple[int, str, str], ...] = ()
    """Records the reader set aside instead of carrying them (longer than
    ``read.max_record_bytes``, ``transform.on_error`` other than ``fail``): (file line, reason,
    the record's first ``SET_ASIDE_PREFIX_BYTES`` as text). Such a chunk holds no other rows;
    ``kind = "arrow"`` (JSON Lines, reader-parsed CSV): ``data`` is an empty table with the
    file's columns and types, ``row_start`` the record's file line."""

    @property
    def unit(self) -> str:
        """How a row is numbered: by file ``line`` (CSV parsed in workers, records set aside)
        or data ``row``."""
        return "line" if self.kind == "csv" or self.set_aside else "row"

    @property
    def label(self) -> str:
        end = self.row_start + self.rows - 1
        return f"{self.source_name}[chunk {self.index}, {self.unit}s {self.row_start}-{end}]"

    @property
    def nbytes(self) -> int:
        return len(self.data)


SET_ASIDE_PREFIX_BYTES = 1024
"""Raw text kept of a record set aside for its length: enough to recognise it, small in a dead letter."""


@dataclass(frozen=True, slots=True)
class Part:
    """One encoded output file, relative to the output folder (``month=2026-01/part-….parquet``)."""

    relpath: str
    data: bytes = field(repr=False)
    rows: int
    file: str = ""
    """A worker's piece already on disk: the file in the writer's ``incoming`` folder that
    holds it (``data`` is then empty), which the writer moves into its spool."""
    size: int = 0
    """Bytes of ``file``; 0 when the bytes are in ``data``."""

    @property
    def nbytes(self) -> int:
        """The part's bytes, in memory or in its file."""
        return self.size if self.file else len(self.data)


RESULT_COUNTERS = (
    "rows_in",
    "rows_out",
    "rows_rejected",
    "seconds",
    "decode_seconds",
    "steps_seconds",
    "encode_seconds",
)
"""The additive fields of a ``ChunkResult``: summed over split pieces and over a run."""


@dataclass(slots=True)
class CheckTally:
    """One row check on one chunk's output (or summed over a run): failing rows, and up to
    ``MAX_CHECK_EXAMPLES`` of them (file, line or row, the values checked)."""

    failed: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


MAX_CHECK_EXAMPLES = 5
"""Example rows kept per failed check: enough to find the problem, small in every report."""


@dataclass(slots=True)
class ChunkChecks:
    """What the row checks found in one chunk's output (``etl.transform.checks``)."""

    source_name: str
    unit: str
    """How the chunk numbers its rows: file ``line`` or data ``row``."""
    tallies: dict[str, CheckTally] = field(default_factory=dict)
    """Check name (``not_null(id)``, ``expect[0]``) → its tally."""
    keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    """``unique`` checks: column → the non-null values' 128-bit hashes (two little-endian
    uint64 per row) followed by their row numbers (one int64 per row), for the run-wide test."""
    schema: tuple[tuple[str, str], ...] | None = None
    """The output's columns and Arrow types (None when the chunk published no rows)."""

    def merge(self, other: ChunkChecks) -> None:
        """Add ``other`` (a later piece of the same chunk) to this one."""
        for name, t in other.tallies.items():
            mine = self.tallies.setdefault(name, CheckTally())
            mine.failed += t.failed
            mine.examples = (mine.examples + t.examples)[:MAX_CHECK_EXAMPLES]
        for col, data in other.keys.items():
            self.keys[col] = _join_keys(self.keys.get(col, b""), data)
        self.schema = self.schema or other.schema

    @property
    def nbytes(self) -> int:
        return sum(len(k) for k in self.keys.values())


def _join_keys(a: bytes, b: bytes) -> bytes:
    """Two ``ChunkChecks.keys`` blobs as one: hashes first, then row numbers."""
    na, nb = len(a) // 24, len(b) // 24
    return a[: 16 * na] + b[: 16 * nb] + a[16 * na :] + b[16 * nb :]


@dataclass(slots=True)
class ChunkResult:
    """What a worker sends back: encoded parts, rejected rows and a few metrics."""

    source_index: int
    index: int
    rows_in: int
    rows_out: int
    rows_rejected: int = 0
    parts: list[Part] = field(default_factory=list)
    rejects: Part | None = None
    """Rejected rows with source, row number, step and reason (``on_error = "quarantine"``)."""
    seconds: float = 0.0
    """Time inside the worker: decode + steps + encode."""
    attempts: int = 1
    decode_seconds: float = 0.0
    """Arrow IPC bytes to a DataFrame."""
    steps_seconds: float = 0.0
    encode_seconds: float = 0.0
    """Output parts (and dead-letter rows) to bytes."""
    checks: ChunkChecks | None = None
    """Row-check results on this chunk's output (``[checks]``); None when none are set."""

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (a piece already in a file holds none)."""
        own = sum(len(p.data) for p in self.parts) + (self.checks.nbytes if self.checks else 0)
        return own + (len(self.rejects.data) if self.rejects else 0)

    @property
    def output_bytes(self) -> int:
        """Bytes of the parts and dead letters, in memory or in files."""
        return sum(p.nbytes for p in self.parts) + (self.rejects.nbytes if self.rejects else 0)

"""Bytes in and out of Arrow: staged files become chunks; tables become output file bytes.

Reading (``read_chunks``, called from the parent's reader thread pool)
    In: a ``StagedFile`` (CSV, JSON Lines or Parquet; CSV/JSONL may be ``.gz``, ``.zst``,
    ``.zstd`` or ``.bz2``, decided by file extension) and the ``ReadConfig``.
    Out: with ``read.parse = "worker"`` (the default), CSV files become raw-text chunks of
    about ``read.chunk_rows`` lines that the workers parse (``etl.read.csv_cut``). Otherwise
    ``Chunk`` records of exactly ``read.chunk_rows`` rows (the last of a file may be
    shorter), each holding its rows as Arrow IPC stream bytes, parsed here by pyarrow's
    C++ readers. Decompression (ISA-L for gzip, about 3.5x zlib's speed) and parsing
    release the GIL, so reader threads run in parallel. Chunk boundaries depend only on
    ``chunk_rows`` and the file, never on pyarrow's block size.
    Every failure raises ``DataError`` naming the source, the chunk, the line when it can
    be found, and what pyarrow reported.

IPC (``encode_ipc``/``decode_ipc``): how chunks cross the process boundary.

(Output files are encoded in the workers: ``etl.core.parts``.)
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from isal import igzip
from isal.igzip_lib import IsalError

from etl.core.chunks import csv_options, encode_ipc, text_encoding, undecodable
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import Chunk, StagedFile
from etl.read.csv_cut import split_csv, splittable
from etl.read.long_lines import Aside, LongLines

CSV_BLOCK_BYTES = 4 << 20
"""Bytes pyarrow parses per CSV block: bigger means fewer round trips and more memory per
reader thread; one CSV row (embedded newlines included) must fit in a block."""
JSON_BLOCK_BYTES = 8 << 20
"""Bytes per JSON Lines block. The first block is also the sample the file's schema is
inferred from, so bigger means fewer "type changed later in the file" errors."""

# What a broken compressed stream raises: pyarrow's streams, ISA-L's gzip, Python's file objects.
# (isal's stubs declare IsalError as an instance, ``IsalError: Exception``; it is a class.)
STREAM_ERRORS: tuple[type[Exception], ...] = (
    pa.ArrowException,
    OSError,
    EOFError,
    cast("type[Exception]", IsalError),
)

COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}

BatchSource = Callable[[StagedFile, ReadConfig, int | None, "Consumed"], Iterator[pa.RecordBatch]]
Found = tuple[int, str]  # (1-based data row, what is wrong with it)
Locator = Callable[[StagedFile, ReadConfig, int | None, int, Exception], Found | None]


# ------------------------------------------------------------------------------ IPC


class Consumed:
    """How far into the file as stored a reader has got: each chunk's ``source_bytes``.

    Compressed files count compressed bytes: the position of the raw file under the
    decompressor. That is known at once, never goes back, and sums exactly to the size on
    disk, the total the progress bars get from staged sizes and Content-Length. The other
    choice, the decompressed share scaled, needs the decompressed size, which gzip records
    only at the end of the file and modulo 4 GiB (zstd and bz2 not at all). The position
    runs ahead of a chunk by the decompressor's read-ahead (a few hundred KiB), so a chunk
    may be counted a little early, never twice; the last chunk of a file is read when the
    raw file is at its end, so a file's chunks add up to its size. Parquet counts the share
    of its rows read (its footer is read first, so the position says nothing)."""

    def __init__(self, size: int, aside: Aside | None = None) -> None:
        self.size = size
        self.aside = aside
        """Where lines too long are noted (JSON Lines, reader-parsed CSV): see ``etl.read.long_lines``."""
        self.counted = 0
        self._raw: BinaryIO | None = None
        self._at: int | None = None

    def watch(self, raw: BinaryIO) -> None:
        """The raw file the decompressor reads (a second pass's replaces the first's)."""
        self._raw, self._at = raw, None

    def reach(self, position: int) -> None:
        """Set the position directly (Parquet: the share of rows read)."""
        self._at = position

    def take(self) -> int:
        """Bytes consumed since the last call."""
        if self._at is not None:
            position = self._at
        elif self._raw is None or self._raw.closed:
            position = self.size  # the stream is done with (or was never opened): all of it
        else:
            position = self._raw.tell()
        n = max(min(position, self.size) - self.counted, 0)
        self.counted += n
        return n


def read_chunks(
    staged: StagedFile, cfg: ReadConfig, *, block_size: int | None = None, set_aside: bool = False
) -> Generator[Chunk, None, None]:
    """Yield the file's rows as ``Chunk`` records of ``cfg.chunk_rows`` rows.

    CSV columns are all read as strings, so a chunk's types never depend on which rows
    it happens to hold: the output is the same whatever the chunk size, and types come
    from explicit ``cast`` steps. An unquoted field equal to one of ``cfg.null_values``
    is null; a quoted field never is, so ``""`` stays an empty string and ``"NA"`` stays
    text (PostgreSQL ``COPY ... CSV`` follows the same rule).

    JSON Lines (always UTF-8) keeps JSON's numbers and booleans typed. The schema is
    inferred from the file's first block and enforced on the rest, so every chunk of a
    file has the same types; fields that are null or date-like in the first block are
    read as strings (``cast``/``parse_datetime`` give them types).

    Parquet keeps its own types. Empty files (0 bytes, or nothing after decompression)
    and files with a header and no rows yield no chunks. ``block_size`` overrides the
    CSV/JSON block size (tests use it to show chunking does not depend on it).

    Every chunk carries the bytes of the file as stored that it consumed (``Consumed``).
    ``set_aside`` (``transform.on_error`` other than ``fail``): a CSV record longer than
    ``read.max_record_bytes`` (parsed in the workers) is skipped without being held whole
    and handed on as a chunk of its own that holds only its line and first bytes
    (``Chunk.set_aside``), for the worker to reject; otherwise it fails the file.
    """
    read_batches = _BATCH_SOURCES.get(staged.source.format)
    if read_batches is None:
        raise DataError(
            f"unknown input format {staged.source.format!r}; expected one of {', '.join(sorted(_BATCH_SOURCES))}",
            item=staged.source.name,
        )
    size = _file_size(staged)
    if size == 0:
        return
    consumed = Consumed(size)
    if staged.source.format == "csv" and splittable(cfg):
        for chunk in _text_chunks(staged, cfg, consumed, set_aside):
            yield replace(chunk, source_bytes=consumed.take())
        return
    if set_aside and _by_lines(staged, cfg):  # under fail pyarrow finds long records; the line is looked up then
        consumed.aside = Aside(set_aside, header=staged.source.format == "csv")
    batches = _guarded(staged, cfg, block_size, _long_records(staged, cfg, block_size, read_batches, consumed))
    row_start = index = 0
    schema: pa.Schema | None = None
    for table in _rebatch(batches, cfg.chunk_rows):
        schema = table.schema
        yield Chunk(
            source_index=staged.source.index,
            source_name=staged.source.name,
            index=index,
            row_start=row_start,
            rows=table.num_rows,
            data=encode_ipc(table),
            source_bytes=consumed.take(),
        )
        row_start += table.num_rows
        index += 1
        for chunk in _set_aside_chunks(staged, consumed, schema, index):
            yield chunk
            index += 1
            row_start += 1  # the record set aside keeps its data row number
    for chunk in _set_aside_chunks(staged, consumed, schema, index):
        yield replace(chunk, source_bytes=consumed.take())
        index += 1


def _by_lines(staged: StagedFile, cfg: ReadConfig) -> bool:
    """Whether long lines are taken out before pyarrow parses (``etl.read.long_lines``):
    JSON Lines, and CSV in an encoding whose newline is the byte ``\\n``."""
    fmt = staged.source.format
    return fmt == "jsonl" or (fmt == "csv" and "\n".encode(text_encoding(cfg.encoding)) == b"\n")


def _set_aside_chunks(staged: StagedFile, consumed: Consumed, schema: pa.Schema | None, index: int) -> Iterator[Chunk]:
    """A chunk of its own for each record set aside since the last call (``Chunk.set_aside``,
    rows named by file line); it carries the file's columns as an empty table."""
    if consumed.aside is None:
        return
    empty = encode_ipc((schema or pa.schema([])).empty_table())
    for record in consumed.aside.take():
        yield Chunk(staged.source.index, staged.source.name, index, record[0], 1, empty, set_aside=(record,))
        index += 1


def _text_chunks(staged: StagedFile, cfg: ReadConfig, consumed: Consumed, set_aside: bool) -> Iterator[Chunk]:
    try:
        with _open_stream(staged, consumed) as stream:
            yield from split_csv(stream, staged, cfg, set_aside=set_aside)
    except STREAM_ERRORS as e:
        raise DataError(f"cannot read csv file {_where(staged)}: {e}", item=staged.source.name) from e


def _rebatch(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Regroup batches of any size into tables of exactly ``rows`` rows (the last: fewer)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        count += batch.num_rows
        if count < rows:
            continue
        table = pa.Table.from_batches(pending)
        start = 0
        while count - start >= rows:
            yield table.slice(start, rows)  # zero-copy; IPC encoding copies just the slice
            start += rows
        rest = table.slice(start)
        pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _long_records(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, read_batches: BatchSource, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    """The reader's batches; when a record is longer than its block (pyarrow: "straddling
    object"), the file is read again with blocks of ``read.max_record_bytes``, past the rows
    already handed on. Only such files pay for the big blocks."""
    delivered = 0
    check = staged.source.format != "parquet"  # Parquet has no records of text
    try:
        for batch in read_batches(staged, cfg, block_size, consumed):
            if check:
                _check_record_sizes(staged, cfg, batch, delivered)
            delivered += batch.num_rows
            yield batch
        return
    except pa.ArrowInvalid as e:
        if not _straddles(e) or (block_size or 0) > cfg.max_record_bytes:
            raise
    skip = delivered
    for batch in read_batches(staged, cfg, cfg.max_record_bytes + 1, consumed):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch = batch.slice(skip) if skip else batch
        _check_record_sizes(staged, cfg, batch, delivered)
        delivered += batch.num_rows
        yield batch
        skip = 0


def _check_record_sizes(staged: StagedFile, cfg: ReadConfig, batch: pa.RecordBatch, before: int) -> None:
    """Fail on a row whose text fields alone pass ``read.max_record_bytes`` (pyarrow's
    streaming readers accept records longer than their block; the limit is ours)."""
    sizes = None
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            length = pc.fill_null(pc.binary_length(column), 0).cast(pa.int64())
            sizes = length if sizes is None else pc.add(sizes, length)
    if sizes is None or len(sizes) == 0 or pc.max(sizes).as_py() <= cfg.max_record_bytes:
        return
    row = before + int(pc.index(sizes, pc.max(sizes)).as_py()) + 1
    raise _long_line(staged, cfg) or DataError(
        f"cannot read {staged.source.format} file {_where(staged)}: data row {row} holds "
        f"{pc.max(sizes).as_py()} bytes of text, more than read.max_record_bytes ({cfg.max_record_bytes}); "
        "raise it if records this long are real",
        item=f"{staged.source.name}[chunk {(row - 1) // cfg.chunk_rows}]",
    )


def _straddles(e: Exception) -> bool:
    return "straddling object" in str(e)


def _guarded(
    staged: StagedFile,
    cfg: ReadConfig,
    block_size: int | None,
    batches: Iterator[pa.RecordBatch],
) -> Iterator[pa.RecordBatch]:
    """Pass batches through; turn pyarrow's errors into a DataError naming file and chunk."""
    delivered = 0
    try:
        for batch in batches:
            delivered += batch.num_rows
            yield batch
    except STREAM_ERRORS + (UnicodeError,) as e:  # UnicodeError: read.encoding
        if delivered == 0 and _is_blank(staged):
            return  # a compressed empty file, or only blank lines: no rows, not an error
        raise _read_error(staged, cfg, block_size, delivered, e) from e


def _read_error(staged: StagedFile, cfg: ReadConfig, block_size: int | None, delivered: int, e: Exception) -> DataError:
    src = staged.source
    where = _where(staged)
    if _straddles(e):  # even at max_record_bytes: the locators would read that record whole
        return _long_line(staged, cfg) or DataError(
            f"cannot read {src.format} file {where}: a record at or after data row {delivered + 1} is longer "
            f"than read.max_record_bytes ({cfg.max_record_bytes} bytes); raise it if records this long are real"
            + ("; otherwise a quoted field never closes" if src.format == "csv" else ""),
            item=f"{src.name}[chunk {delivered // cfg.chunk_rows}]",
        )
    locate = _LOCATORS.get(src.format)
    found = locate(staged, cfg, block_size, delivered, e) if locate else None
    row, detail = (
        (found[0], f"{found[1]} (pyarrow: {e})")
        if found
        else (delivered + 1, f"{e} (at or after data row {delivered + 1})")
    )
    return DataError(
        f"cannot read {src.format} file {where}: {detail}",
        item=f"{src.name}[chunk {(row - 1) // cfg.chunk_rows}]",
    )


def _long_line(staged: StagedFile, cfg: ReadConfig) -> DataError | None:
    """The error naming the first line longer than ``read.max_record_bytes`` (error path
    only: read through ``LongLines``, which stops there, so never more than the limit held)."""
    if not _by_lines(staged, cfg):
        return None
    try:
        with _open_stream(staged, None, cfg, Aside(False, header=staged.source.format == "csv")) as stream:
            while stream.read(JSON_BLOCK_BYTES):
                pass
    except DataError as e:
        return e
    except STREAM_ERRORS:
        return None
    return None


def _where(staged: StagedFile) -> str:
    src = staged.source
    return src.url if src.url == str(staged.path) else f"{src.url} (staged as {staged.path})"


def _file_size(staged: StagedFile) -> int:
    try:
        return staged.path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot open staged file {staged.path}: {e.strerror}", item=staged.source.name) from e


def _compression(staged: StagedFile) -> str | None:
    for name in (staged.path.name, staged.source.name):
        codec = COMPRESSION_BY_SUFFIX.get(Path(name).suffix.lower())
        if codec:
            return codec
    return None


def _open_stream(
    staged: StagedFile, consumed: Consumed | None = None, cfg: ReadConfig | None = None, aside: Aside | None = None
) -> BinaryIO:
    """The file's decompressed bytes; gzip through ISA-L (pyarrow's zlib is ~3.5x slower).
    ``consumed`` watches the raw file under the decompressor. With ``cfg`` and an ``aside``
    (``consumed``'s unless given), lines longer than ``read.max_record_bytes`` are taken out
    (``etl.read.long_lines``)."""
    codec = _compression(staged)
    if codec is None:
        stream: BinaryIO = open(staged.path, "rb")
        raw = stream
    elif codec == "gzip":
        stream = cast(BinaryIO, igzip.open(staged.path, "rb"))  # type: ignore[no-untyped-call]  # isal's igzip.open has no annotations
        raw = cast(BinaryIO, stream.fileobj)  # type: ignore[attr-defined]  # GzipFile's raw file; not in the BinaryIO protocol
    else:
        raw = open(staged.path, "rb")
        stream = io.BufferedReader(pa.input_stream(raw, compression=codec))  # closes ``raw`` when closed
    if consumed is not None:
        consumed.watch(raw)
        aside = aside or consumed.aside
    if cfg is not None and aside is not None:
        encoding = text_encoding(cfg.encoding) if staged.source.format == "csv" else "utf-8"
        stream = cast(BinaryIO, LongLines(stream, staged, cfg.max_record_bytes, aside, encoding))
    return stream


def _is_blank(staged: StagedFile) -> bool:
    """True when the decompressed file holds only whitespace (error path only)."""
    try:
        with _open_stream(staged) as stream:
            while block := stream.read(1 << 20):
                if block.strip():
                    return False
    except STREAM_ERRORS:
        return False
    return True


# ---------------------------------------------------------------------------- CSV


def _csv_batches(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    read, parse, convert = csv_options(cfg, block_size=block_size or CSV_BLOCK_BYTES)
    with (
        _open_stream(staged, consumed, cfg) as stream,
        pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert) as reader,
    ):
        reader.schema.names  # noqa: B018 - raises UnicodeError here for a header that is not valid text
        yield from reader


def _locate_csv_error(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, skip: int, error: Exception
) -> Found | None:
    """Find the first record after the ``skip`` already read whose field count differs
    from the header's (error path only: pyarrow does not number the rows it rejects)."""
    if isinstance(error, UnicodeError) or "invalid UTF8" in str(error):
        return _locate_bad_text(staged, cfg.encoding)
    if "CSV parse error" not in str(error):
        return None  # not a row-shape problem: counting fields would blame the wrong row
    try:
        with _open_stream(staged) as stream:
            text = io.TextIOWrapper(stream, encoding=cfg.encoding, errors="replace", newline="")
            records = csv.reader(text, delimiter=cfg.delimiter)
            width = len(next(records, []))
            rows = 0
            for record in records:
                if not record:
                    continue  # pyarrow skips empty lines too
                rows += 1
                if rows > skip and len(record) != width:
                    return rows, (
                        f"line {records.line_num} (data row {rows}): expected {width} fields "
                        f"as in the header, got {len(record)}: "
                        f"{cfg.delimiter.join(record)[:80]!r}"
                    )
    except STREAM_ERRORS + (csv.Error, LookupError):
        return None
    return None


def _locate_bad_text(staged: StagedFile, encoding: str) -> Found | None:
    """The first line that is not valid ``encoding`` text (error path only; read in blocks)."""
    decoder = codecs.getincrementaldecoder(text_encoding(encoding))()
    line, offset = 1, 0
    try:
        with _open_stream(staged) as stream:
            while block := stream.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeError as e:
                    start = min(max(getattr(e, "start", 0), 0), len(block))
                    where = undecodable(block[: start + 4], encoding, line) or f"line {line}: not {encoding} text"
                    row = line + block.count(b"\n", 0, start) - 1  # the header is line 1
                    return max(row, 1), f"{where} (byte {offset + start} of the decompressed file)"
                line += block.count(b"\n")
                offset += len(block)
    except STREAM_ERRORS:
        return None
    return None


# ---------------------------------------------------------------------- JSON Lines


def _jsonl_batches(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    read = pajson.ReadOptions(block_size=block_size or JSON_BLOCK_BYTES)
    aside = consumed.aside
    if aside is not None:
        noted = Aside(aside.set_aside, header=False)
        try:
            schema = _jsonl_schema(staged, read, cfg, noted)
        except pa.ArrowInvalid:
            if not noted.found or not _nothing_but_long_lines(staged, cfg, consumed):
                raise
            return  # every line was set aside (noted in ``consumed.aside``): no rows, no schema
    else:
        schema = _jsonl_schema(staged, read)
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
    with (
        _open_stream(staged, consumed, cfg) as stream,
        pajson.open_json(stream, read_options=read, parse_options=parse) as reader,
    ):
        yield from reader


def _nothing_but_long_lines(staged: StagedFile, cfg: ReadConfig, consumed: Consumed) -> bool:
    """Read the file through ``consumed``'s line filter: True when only blank text is left
    (every record was set aside, and noted there)."""
    with _open_stream(staged, consumed, cfg) as stream:
        while block := stream.read(JSON_BLOCK_BYTES):
            if block.strip():
                return False
    return True


def _jsonl_schema(
    staged: StagedFile, read: pajson.ReadOptions, cfg: ReadConfig | None = None, aside: Aside | None = None
) -> pa.Schema:
    """The schema pyarrow infers from the first block, loosened (see ``_loosen``); with an
    ``aside``, from the lines not too long."""
    with _open_stream(staged, None, cfg, aside) as stream, pajson.open_json(stream, read_options=read) as first:
        return pa.schema([f.with_type(_loosen(f.type)) for f in first.schema])


def _loosen(t: pa.DataType) -> pa.DataType:
    """Null and inferred timestamp types become string: later rows may hold any text."""
    if pa.types.is_null(t) or pa.types.is_timestamp(t):
        return pa.string()
    if pa.types.is_list(t):
        return pa.list_(_loosen(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_loosen(f.type)) for f in t])
    return t


def _locate_json_error(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, skip: int, error: Exception
) -> Found | None:
    """Find the first bad line after the ``skip`` records already read (error path only).

    pyarrow numbers rows within a block, not the file, so the file is re-read here:
    records up to ``skip`` are passed over unparsed, then each line is checked.
    """
    read = pajson.ReadOptions(block_size=block_size or JSON_BLOCK_BYTES)
    try:
        schema: pa.Schema | None = _jsonl_schema(staged, read)
    except (pa.ArrowException, OSError):
        schema = None  # the first block itself is broken: check the syntax only
    try:
        with _open_stream(staged) as stream:
            records = 0
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                records += 1
                if records > skip and (problem := _json_line_problem(line, schema)):
                    return records, f"line {number}: {problem}"
    except STREAM_ERRORS:
        return None  # e.g. broken compression: pyarrow's message is all there is
    return None


def _json_line_problem(line: bytes, schema: pa.Schema | None) -> str | None:
    try:
        record = json.loads(line)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {line.strip()[:80]!r}"
    if schema is None:
        return None
    for key, value in record.items():
        index = schema.get_field_index(key)
        if index < 0:
            return (
                f"field {key!r} is not in the schema inferred from the file's first block "
                f"(fields: {', '.join(schema.names)})"
            )
        field = schema.field(index)
        if not _fits(value, field.type):
            return (
                f"field {key!r} holds {value!r}, but the file's first block made it "
                f"{field.type}; every row must fit the types inferred from that block"
            )
    return None


def _fits(value: Any, t: pa.DataType) -> bool:
    """Whether pyarrow's JSON reader can put this parsed JSON value into type ``t``."""
    if value is None:
        return True
    if pa.types.is_boolean(t):
        return isinstance(value, bool)
    if pa.types.is_integer(t):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(t):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_string(t):
        return isinstance(value, str)
    if pa.types.is_list(t):
        return isinstance(value, list) and all(_fits(v, t.value_type) for v in value)
    if pa.types.is_struct(t):
        return isinstance(value, dict)
    return True  # a type not inferred by the JSON reader: do not guess


# -------------------------------------------------------------------------- Parquet


def _parquet_batches(
    staged: StagedFile, cfg: ReadConfig, block_size: int | None, consumed: Consumed
) -> Iterator[pa.RecordBatch]:
    if _compression(staged):
        raise DataError(
            f"{staged.path.name}: Parquet compresses inside the file; an outer "
            f"{_compression(staged)} layer is not supported, decompress it first",
            item=staged.source.name,
        )
    with pq.ParquetFile(staged.path) as f:
        total, read = max(f.metadata.num_rows, 1), 0
        consumed.reach(0)
        for batch in f.iter_batches(batch_size=cfg.chunk_rows):
            read += batch.num_rows
            consumed.reach(consumed.size * read // total)
            yield batch


_BATCH_SOURCES: dict[str, BatchSource] = {
    "csv": _csv_batches,
    "jsonl": _jsonl_batches,
    "parquet": _parquet_batches,
}

_LOCATORS: dict[str, Locator] = {
    "csv": _locate_csv_error,
    "jsonl": _locate_json_error,
}


# ------------------------------------------------------------------------- encoding

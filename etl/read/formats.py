"""Staged files become chunks: the reader picked by format, exact chunks, clear errors.

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

The readers themselves are ``etl.read.readers`` (one per format), the decompressed stream
and the byte count each chunk carries ``etl.read.streams``; this module picks the reader,
cuts exact chunks and turns a reader's failure into the ``DataError``.

(Chunks cross the process boundary as Arrow IPC: ``etl.core.chunks``. Output files are
encoded in the workers: ``etl.core.parts``.)
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from etl.core.chunks import encode_ipc, text_encoding
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import Chunk, StagedFile
from etl.read.csv_cut import split_csv, splittable
from etl.read.long_lines import Aside
from etl.read.readers import BATCH_SOURCES, JSON_BLOCK_BYTES, LOCATORS, BatchSource
from etl.read.streams import STREAM_ERRORS, Consumed, file_size, is_blank, open_stream, where


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
    read_batches = BATCH_SOURCES.get(staged.source.format)
    if read_batches is None:
        raise DataError(
            f"unknown input format {staged.source.format!r}; expected one of {', '.join(sorted(BATCH_SOURCES))}",
            item=staged.source.name,
        )
    size = file_size(staged)
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
        with open_stream(staged, consumed) as stream:
            yield from split_csv(stream, staged, cfg, set_aside=set_aside)
    except STREAM_ERRORS as e:
        raise DataError(f"cannot read csv file {where(staged)}: {e}", item=staged.source.name) from e


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
        f"cannot read {staged.source.format} file {where(staged)}: data row {row} holds "
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
        if delivered == 0 and is_blank(staged):
            return  # a compressed empty file, or only blank lines: no rows, not an error
        raise _read_error(staged, cfg, block_size, delivered, e) from e


def _read_error(staged: StagedFile, cfg: ReadConfig, block_size: int | None, delivered: int, e: Exception) -> DataError:
    src = staged.source
    place = where(staged)
    if _straddles(e):  # even at max_record_bytes: the locators would read that record whole
        return _long_line(staged, cfg) or DataError(
            f"cannot read {src.format} file {place}: a record at or after data row {delivered + 1} is longer "
            f"than read.max_record_bytes ({cfg.max_record_bytes} bytes); raise it if records this long are real"
            + ("; otherwise a quoted field never closes" if src.format == "csv" else ""),
            item=f"{src.name}[chunk {delivered // cfg.chunk_rows}]",
        )
    locate = LOCATORS.get(src.format)
    found = locate(staged, cfg, block_size, delivered, e) if locate else None
    row, detail = (
        (found[0], f"{found[1]} (pyarrow: {e})")
        if found
        else (delivered + 1, f"{e} (at or after data row {delivered + 1})")
    )
    return DataError(
        f"cannot read {src.format} file {place}: {detail}",
        item=f"{src.name}[chunk {(row - 1) // cfg.chunk_rows}]",
    )


def _long_line(staged: StagedFile, cfg: ReadConfig) -> DataError | None:
    """The error naming the first line longer than ``read.max_record_bytes`` (error path
    only: read through ``LongLines``, which stops there, so never more than the limit held)."""
    if not _by_lines(staged, cfg):
        return None
    try:
        with open_stream(staged, None, cfg, Aside(False, header=staged.source.format == "csv")) as stream:
            while stream.read(JSON_BLOCK_BYTES):
                pass
    except DataError as e:
        return e
    except STREAM_ERRORS:
        return None
    return None

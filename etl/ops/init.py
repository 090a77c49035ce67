"""``python run.py init job.toml --source URL_OR_PATH``: a commented job file to start from.

Reads the head of one source (a local file, or the first bytes of an http(s) URL: a
Range GET), lists its columns with example values, suggests casts and timestamp formats
from what the values look like, and writes a job file with output and state paths
filled in. The file passes ``validate`` as written; the suggestions are comments and
steps to check, not guesses hidden from the user.

CSV columns arrive as strings (the reader never infers types), so every suggestion is a
``cast`` or ``parse_datetime`` step. A column is suggested a type only when every
non-empty value of the head parses as it; anything else stays a string. JSON Lines keep
their JSON types (strings that look like timestamps get a ``parse_datetime``); Parquet
keeps its own schema, so nothing is suggested.
"""

from __future__ import annotations

import asyncio
import bz2
import csv
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from etl.core.config import DownloadConfig
from etl.core.errors import ConfigError
from etl.core.records import Source
from etl.download.http import fetch_head

HEAD_BYTES = 1 << 20  # bytes of the source read: enough rows to judge types, quick over HTTP
MAX_TEXT = 16 << 20  # decompressed text kept from the head: CSV gzips 5-10x; more is a bomb's padding
SAMPLE_ROWS = 2000  # rows judged per column: more only slows init down; types rarely change later
EXAMPLES = 3  # example values shown per column in the comments

# Timestamp formats tried, most specific first; the first one every value parses with wins.
TIMESTAMP_FORMATS = (
    "%Y-%m-%d %H:%M:%S.%f",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y/%m/%d %H:%M:%S",
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M:%S",
    "%d.%m.%Y %H:%M:%S",
)
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y")
_INT = re.compile(r"^\s*[-+]?\d+\s*$")
_FLOAT = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_BOOLS = {"true", "false", "t", "f", "yes", "no", "y", "n"}
_ISO_ZONED = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Column:
    name: str
    examples: list[str]
    suggestion: str = ""
    """``Int64`` (nullable), ``float64``, ``boolean``, ``timestamp``, ``date`` or ``""`` (keep)."""
    fmt: str | None = None
    utc: bool = False
    nulls: bool = False
    note: str = ""


@dataclass
class Head:
    format: str
    rows: int
    columns: list[Column] = field(default_factory=list)
    delimiter: str = ","


def init_job(path: Path, source: str, *, name: str | None = None, force: bool = False) -> str:
    """Write the job file for ``source`` at ``path`` and return its text. ``ConfigError``
    (exit 2) when the file exists (without ``force``) or the source cannot be read."""
    if path.exists() and not force:
        raise ConfigError("the job file already exists; pass --force to replace it", file=str(path))
    head = read_head(source)
    text = render(path, source, head, name or _job_name(source))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


# --------------------------------------------------------------------------- reading


def read_head(source: str) -> Head:
    """Columns and suggestions from the first ``HEAD_BYTES`` of ``source``."""
    fmt, codec = _kind(source)
    remote = source.startswith(("http://", "https://"))
    if fmt == "parquet":
        if remote:
            raise ConfigError(f"init reads Parquet from a local file only; download {source} first", key="--source")
        return _parquet_head(Path(source))
    raw = _fetch(source) if remote else _read_local(source)
    text = _decompress(raw, codec, source)
    if fmt == "jsonl":
        return _jsonl_head(text, source)
    return _csv_head(text, source)


def _kind(source: str) -> tuple[str, str | None]:
    name = source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    codec = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}.get(Path(name).suffix)
    stem = Path(name).stem if codec else name
    suffix = Path(stem).suffix
    if suffix in (".parquet", ".pq"):
        return "parquet", None
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl", codec
    return "csv", codec


def _fetch(url: str) -> bytes:
    src = Source(0, url, url.rsplit("/", 1)[-1] or url, "csv")
    try:
        return asyncio.run(fetch_head(DownloadConfig(), src, HEAD_BYTES))
    except Exception as e:  # aiohttp.ClientError, TimeoutError, OSError: all mean "cannot read it"
        raise ConfigError(f"cannot read {url}: {type(e).__name__}: {e}", key="--source") from None


def _read_local(source: str) -> bytes:
    path = Path(source.removeprefix("file://"))
    try:
        with path.open("rb") as f:
            return f.read(HEAD_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}", key="--source") from None


def _decompress(raw: bytes, codec: str | None, source: str) -> bytes:
    try:
        if codec == "gzip":
            return zlib.decompressobj(wbits=47).decompress(raw, MAX_TEXT)
        if codec == "bz2":
            return bz2.BZ2Decompressor().decompress(raw, MAX_TEXT)
        if codec == "zstd":
            return _zstd(raw)
    except (zlib.error, OSError, ValueError, EOFError) as e:
        raise ConfigError(f"cannot decompress the head of {source} ({codec}): {e}", key="--source") from None
    return raw


def _zstd(raw: bytes) -> bytes:
    stream = pa.input_stream(pa.BufferReader(raw), compression="zstd")
    out = bytearray()
    try:
        while len(out) < MAX_TEXT and (piece := stream.read(1 << 16)):
            out += piece
    except (OSError, pa.ArrowInvalid):
        pass  # the head ends mid-frame: keep what decompressed
    return bytes(out)


def _whole_lines(text: bytes) -> bytes:
    end = text.rfind(b"\n")
    return text if end < 0 else text[: end + 1]


def _csv_head(text: bytes, source: str) -> Head:
    body = _whole_lines(text)
    try:
        sample = body[:65536].decode("utf-8", errors="replace")
        delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = ","
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    table: pa.Table | None = None
    problem: Exception | None = None
    for text_ in (body, _whole_lines(body[:-1])):  # the head may end inside a quoted value
        try:
            names = pacsv.open_csv(io.BytesIO(text_), parse_options=parse).schema.names
            convert = pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, null_values=[""], strings_can_be_null=True
            )
            table = pacsv.read_csv(io.BytesIO(text_), parse_options=parse, convert_options=convert)
            break
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            problem = e
    if table is None:
        raise ConfigError(f"cannot read the head of {source} as CSV: {problem}", key="--source")
    table = table.slice(0, SAMPLE_ROWS)
    head = Head("csv", table.num_rows, delimiter=delimiter)
    for name in table.column_names:
        values = table.column(name).to_pylist()
        head.columns.append(_judge_text(name, values))
    return head


def _jsonl_head(text: bytes, source: str) -> Head:
    body = _whole_lines(text)
    try:
        inferred = pajson.read_json(io.BytesIO(body)).schema
        # as the read stage does: inferred timestamps and nulls are read as text
        loose = pa.schema([f.with_type(_loosen(f.type)) for f in inferred])
        table = pajson.read_json(io.BytesIO(body), parse_options=pajson.ParseOptions(explicit_schema=loose))
    except pa.ArrowInvalid as e:
        raise ConfigError(f"cannot read the head of {source} as JSON Lines: {e}", key="--source") from None
    table = table.slice(0, SAMPLE_ROWS)
    head = Head("jsonl", table.num_rows)
    for f in table.schema:
        values = table.column(f.name).to_pylist()
        if pa.types.is_string(f.type):
            col = _judge_text(f.name, values, numbers=False)
        else:
            col = Column(f.name, _examples(values), nulls=None in values, note=f"JSON {f.type}")
        head.columns.append(col)
    return head


def _loosen(t: pa.DataType) -> pa.DataType:
    """The JSON Lines reader's rule (``etl.read.readers``): timestamps and nulls pyarrow
    infers become strings, as later rows may hold any text."""
    return pa.string() if pa.types.is_null(t) or pa.types.is_timestamp(t) else t


def _parquet_head(path: Path) -> Head:
    try:
        pf = pq.ParquetFile(path)
        batch = next(pf.iter_batches(batch_size=SAMPLE_ROWS), None)
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"cannot read {path} as Parquet: {e}", key="--source") from None
    head = Head("parquet", 0 if batch is None else batch.num_rows)
    for f in pf.schema_arrow:
        values = [] if batch is None else batch.column(f.name).to_pylist()
        head.columns.append(Column(f.name, _examples(values), note=f"Parquet {f.type}"))
    return head


# ----------------------------------------------------------------------------- judging


def _examples(values: list[Any]) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v is not None and str(v) not in seen:
            seen.append(str(v))
        if len(seen) == EXAMPLES:
            break
    return seen


def _judge_text(name: str, values: list[Any], numbers: bool = True) -> Column:
    present = [str(v).strip() for v in values if v is not None and str(v).strip() != ""]
    col = Column(name, _examples(values), nulls=len(present) < len(values))
    if not present:
        col.note = "always empty in the head"
        return col
    if numbers and all(_INT.match(v) for v in present) and all(abs(int(v)) < 2**63 for v in present):
        col.suggestion = "Int64"  # nullable: an empty value further down the file stays null
        return col
    if numbers and all(_FLOAT.match(v) for v in present):
        col.suggestion = "float64"
        return col
    if all(v.lower() in _BOOLS for v in present):
        col.suggestion = "boolean"
        return col
    if all(_ISO_ZONED.match(v) for v in present):
        col.suggestion, col.utc = "timestamp", True
        col.note = "ISO 8601 with a zone: parsed to UTC"
        return col
    for fmt in TIMESTAMP_FORMATS:
        if _all_parse(present, fmt):
            col.suggestion, col.fmt = "timestamp", fmt
            return col
    for fmt in DATE_FORMATS:
        if _all_parse(present, fmt):
            col.suggestion, col.fmt = "date", fmt
            return col
    distinct = len(set(present))
    if len(present) >= 50 and distinct <= 20:
        col.note = f"{distinct} distinct values: consider category"
    return col


def _all_parse(values: list[str], fmt: str) -> bool:
    try:
        for v in values:
            datetime.strptime(v, fmt)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- writing


def _job_name(source: str) -> str:
    base = source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    stem = base.split(".", 1)[0]
    stem = re.sub(r"[-_.]?\d+$", "", stem) or stem  # trips-000 -> trips
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-") or "job"


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def render(path: Path, source: str, head: Head, name: str) -> str:
    """The job file's text (see the module docstring)."""
    remote = source.startswith(("http://", "https://"))
    if remote:
        url = source
    else:
        local = Path(source.removeprefix("file://")).resolve()
        url = os.path.relpath(local, path.resolve().parent)
    width = max([len(c.name) for c in head.columns] + [6])
    lines = [
        f"# Job file written by `run.py init` from {source}",
        f"# ({head.rows} rows of its head read). Check the suggested steps, then:",
        f"#     python run.py validate --config {path.name} --explain",
        f"#     python run.py --config {path.name}",
        "# Every key is described in the README's job-file reference; `run.py schema` gives",
        "# editors completion and checking.",
        "",
        "[job]",
        f"name = {_str(name)}",
        "# Lock, manifest (which sources were already processed) and the last run reports.",
        'state_dir = ".etl-state"',
        "",
        "[sources]",
        "# More files: a glob (data/*.csv.gz), a range (part-{000..011}.csv.gz) or more URLs.",
        f"urls = [{_str(url)}]",
        f'format = "{head.format}"',
        "",
    ]
    if head.delimiter != ",":
        lines += ["[read]", f"delimiter = {_str(head.delimiter)}", ""]
    lines += [
        "[transform]",
        "# Rows with a value no cast accepts go to <output>/_rejected/ and the run exits 3;",
        '# "fail" stops the run at the first one instead.',
        'on_error = "quarantine"',
        "",
        f"# Columns ({len(head.columns)}), example values and the suggested type:",
    ]
    for c in head.columns:
        shown = ", ".join(_str(e) for e in c.examples) or "(no values)"
        what = c.suggestion + (f" ({c.fmt})" if c.fmt else "") if c.suggestion else "keep as is"
        note = f"; {c.note}" if c.note else ""
        lines.append(f"#   {c.name:<{width}}  {shown}  ->  {what}{note}")
    lines.append("")
    casts = {c.name: c.suggestion for c in head.columns if c.suggestion not in ("", "timestamp", "date")}
    if casts:
        lines += [
            "# Text becomes typed values; spaces around numbers are accepted, empty text is null.",
            "[[transform.steps]]",
            'op = "cast"',
            "columns = { " + ", ".join(f"{_key(k)} = {_str(v)}" for k, v in casts.items()) + " }",
            "",
        ]
    groups: dict[tuple[str, str | None, bool], list[str]] = {}
    for c in head.columns:
        if c.suggestion in ("timestamp", "date"):
            groups.setdefault((c.suggestion, c.fmt, c.utc), []).append(c.name)
    for (kind, fmt, utc), names in groups.items():
        if kind == "date":
            lines += [
                "[[transform.steps]]",
                'op = "cast"',
                "columns = { " + ", ".join(f'{_key(n)} = "date"' for n in names) + " }",
                f"format = {_str(fmt or '%Y-%m-%d')}",
                "",
            ]
        else:
            lines += [
                "[[transform.steps]]",
                'op = "parse_datetime"',
                "columns = [" + ", ".join(_str(n) for n in names) + "]",
                *([f"format = {_str(fmt)}"] if fmt else []),
                *(["utc = true"] if utc else []),
                "",
            ]
    lines += [
        "# More steps: filter, derive, select, rename, fillna, dropna, lookup, sql, python",
        "# (README: Transform steps).",
        "",
        "[output]",
        "# Published only when every chunk succeeded; the previous output stays until then.",
        f"path = {_str('out/' + name)}",
        'format = "parquet"',
        '# partition_by = ["month"]   # hive-style folders; derive the column first',
        "",
    ]
    return "\n".join(lines)

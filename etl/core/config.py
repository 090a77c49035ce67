"""The typed job model: one class per section of the job file, validated once at start-up.

``load_job(path, overrides)`` is the only entry point: ``etl.core.jobfile`` reads the
TOML, applies the ``ETL__…`` and ``--set`` overrides, resolves ``${ENV_VAR}`` and turns
validation errors into one ``ConfigError`` naming the key path and the file; then relative
paths resolve against the job file's folder. Sizes and shares (``"64MiB"``, ``"5%"``) are
parsed by ``etl.core.units``.

Every model forbids unknown keys. Every model is plain, picklable data: the transform
stage sends ``TransformConfig`` to worker processes.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from etl.core import jobfile
from etl.core.units import parse_share, parse_size


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------- job


class JobSection(Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Job name: names the state folder, logs and the run report."""
    state_dir: Path = Path(".etl-state")
    """Folder for the lock, manifest, run reports and staged downloads (per job inside)."""
    keep_reports: int = Field(default=20, ge=1)
    """How many run reports to keep in the state folder."""
    stop_grace_seconds: float = Field(default=20.0, gt=0, allow_inf_nan=False)
    """After SIGTERM/SIGINT: seconds to stop cleanly (save state, stop workers) before the
    workers are killed and the run exits anyway with 143/130. Keep it under the stop
    timeout of whatever sends the signal (systemd's ``TimeoutStopSec``, a container's)."""


# ------------------------------------------------------------------------- sources


class SourceEntry(Model):
    url: str
    """An http(s):// URL, a file:// URL, or a local path (globs allowed)."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    """Expected SHA-256 of the file's bytes, verified before it is handed on."""
    md5: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{32}$")
    """Expected MD5 of the file's bytes (when the publisher gives no SHA-256)."""
    headers: dict[str, str] = {}
    """Extra request headers for this source (``${ENV}`` values for secrets)."""


class SourcesSection(Model):
    urls: list[str] = []
    """URLs or paths. Local paths may be globs; URLs may hold ranges: ``part-{000..007}.csv``."""
    files: list[SourceEntry] = []
    """Sources that need a checksum or their own headers."""
    urls_file: Path | None = None
    """A text file with one URL per line, optionally followed by a sha256 (for huge jobs)."""
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    """Input format; ``auto`` decides by file extension (``.csv``, ``.jsonl``, ``.parquet``)."""


# ------------------------------------------------------------------------ download


class Timeout(Model):
    """Download timeouts in seconds (like httpx's ``Timeout``)."""

    connect: float = Field(default=10.0, gt=0)
    """Time to open the TCP/TLS connection."""
    read: float = Field(default=30.0, gt=0)
    """Longest gap between two received pieces of the body (a stalled server)."""
    total: float = Field(default=3600.0, gt=0)
    """Longest time for one file, all attempts included."""


class Retry(Model):
    """Retry policy for transient failures (like urllib3's ``Retry``)."""

    attempts: int = Field(default=5, ge=1)
    """Most attempts per file, the first included."""
    backoff: float = Field(default=0.5, ge=0)
    """First backoff in seconds; doubles each attempt, full jitter."""
    backoff_max: float = Field(default=30.0, ge=0)
    """Cap on one backoff (and on an honoured Retry-After)."""
    max_time: float = Field(default=600.0, gt=0)
    """Stop retrying a file after this many seconds."""


class DownloadConfig(Model):
    concurrency: int = Field(default=8, ge=1)
    """Most downloads at once, all hosts together."""
    per_host: int = Field(default=4, ge=1)
    """Most connections to one host at once."""
    timeout: Timeout = Timeout()
    """Connect, read-gap and per-file timeouts in seconds."""
    retry: Retry = Retry()
    """Retries on connection errors, timeouts, 408, 429 and 5xx."""
    headers: dict[str, str] = {}
    """Request headers for every source (``${ENV}`` values for secrets; redacted in logs)."""
    chunk_bytes: int = Field(default=1 << 20, ge=1024)
    """Bytes read from the socket per write to the staging file."""


# ---------------------------------------------------------------------------- read


class ReadConfig(Model):
    chunk_rows: int = Field(default=200_000, ge=1)
    """Rows per chunk handed to the transform stage."""
    threads: int = Field(default=2, ge=1)
    """Files read (and decompressed, parsed) at once by the reader thread pool."""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    """CSV field delimiter."""
    encoding: str = "utf-8"
    """Text encoding of CSV files."""
    null_values: list[str] = [""]
    """CSV strings read as null. CSV columns are read as strings; ``cast`` gives them types."""
    parse: Literal["worker", "reader"] = "worker"
    """Where CSV is parsed: ``worker`` (readers only decompress and cut the text at record
    boundaries; parsing runs in the transform workers, off the parent's cores) or
    ``reader`` (parsed in the parent's reader threads; use it for files with quote
    characters inside unquoted fields, which can hide where a record ends)."""
    max_record_bytes: int = Field(default=64 << 20, ge=1 << 10)
    """Longest record (CSV record or JSON line, in bytes, as text) read; a longer one fails
    the run naming its file and line (CSV parsed in the workers, ``transform.on_error`` other
    than ``fail``: it is rejected instead, its first 1024 bytes kept). Bytes (``67108864``) or
    a size (``"64MiB"``)."""

    @field_validator("max_record_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_size(v) if isinstance(v, str) else v


# ----------------------------------------------------------------------- transform

CastType = Literal[
    "string",
    "int64",
    "Int64",
    "int32",
    "Int32",
    "float64",
    "float32",
    "bool",
    "boolean",
    "category",
    "timestamp",
    "date",
]


class SelectStep(Model):
    op: Literal["select"]
    columns: list[str] = Field(min_length=1)
    """Columns to keep, in this order."""


class DropStep(Model):
    op: Literal["drop"]
    columns: list[str] = Field(min_length=1)
    """Columns to remove."""


class RenameStep(Model):
    op: Literal["rename"]
    columns: dict[str, str] = Field(min_length=1)
    """Old name to new name."""


class CastStep(Model):
    op: Literal["cast"]
    columns: dict[str, CastType] = Field(min_length=1)
    """Column to type; ``Int64`` is a nullable integer, ``timestamp`` parses with ``format``."""
    format: str | None = None
    """strptime format for ``timestamp``/``date`` casts (``%Y-%m-%d %H:%M:%S``)."""


class ParseDatetimeStep(Model):
    op: Literal["parse_datetime"]
    columns: list[str] = Field(min_length=1)
    """Columns to parse into timestamps."""
    format: str | None = None
    """strptime format; ISO 8601 when absent."""
    utc: bool = False
    """Make the timestamps timezone-aware in UTC."""


class FilterStep(Model):
    op: Literal["filter"]
    expr: str = Field(min_length=1)
    """Boolean expression; rows where it is true are kept (README: expressions)."""


class DeriveStep(Model):
    op: Literal["derive"]
    columns: dict[str, str] = Field(min_length=1)
    """New column name to expression, evaluated in order (later ones may use earlier)."""


class FillnaStep(Model):
    op: Literal["fillna"]
    values: dict[str, str | int | float | bool] = Field(min_length=1)
    """Column to the value that replaces its nulls."""


class DropnaStep(Model):
    op: Literal["dropna"]
    columns: list[str] | None = None
    """Columns to look at; all when absent."""
    how: Literal["any", "all"] = "any"
    """Drop a row when any (or all) of those columns are null."""


class LookupStep(Model):
    op: Literal["lookup"]
    path: Path
    """CSV or Parquet file with the lookup table; loaded once per worker."""
    on: str | list[str]
    """Key column(s) in the chunk."""
    right_on: str | list[str] | None = None
    """Key column(s) in the table, when named differently."""
    columns: list[str] | None = None
    """Table columns to bring in; all when absent."""


class PythonStep(Model):
    op: Literal["python"]
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """``module:function`` taking and returning a DataFrame (job folder is importable)."""
    params: dict[str, Any] = {}
    """Keyword arguments passed to the function."""


class SqlStep(Model):
    op: Literal["sql"]
    query: str = Field(min_length=1)
    """A row-wise DuckDB ``SELECT … FROM chunk [WHERE …]`` run on every chunk (needs the
    ``sql`` extra). No aggregates, window functions, ORDER BY, LIMIT, DISTINCT, GROUP BY,
    joins or subqueries: the output must not depend on where chunks are cut."""


Step = Annotated[
    SelectStep
    | DropStep
    | RenameStep
    | CastStep
    | ParseDatetimeStep
    | FilterStep
    | DeriveStep
    | FillnaStep
    | DropnaStep
    | LookupStep
    | PythonStep
    | SqlStep,
    Field(discriminator="op"),
]
STEP_OPS = frozenset(m.model_fields["op"].annotation.__args__[0] for m in get_args(get_args(Step)[0]))


class DaskConfig(Model):
    address: str = "local"
    """Scheduler address (``tcp://host:8786``) or ``local`` for a LocalCluster."""


class TransformConfig(Model):
    executor: Literal["process", "thread", "serial", "dask"] = "process"
    """Where steps run: worker processes (default), threads, inline, or a Dask cluster."""
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Worker count; ``auto`` sizes it from usable CPUs and the memory budget."""
    in_flight: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Chunks submitted and not yet returned; ``auto`` lets the memory plan choose (2x, or fewer, the workers)."""
    steps: list[Step] = []
    """Transform steps applied to every chunk, in order."""
    on_error: Literal["fail", "skip", "quarantine"] = "fail"
    """Rows that fail a cast: fail the run, skip them, or write them to a dead-letter file."""
    max_attempts: int = Field(default=3, ge=1)
    """Attempts per chunk when its worker crashes or times out."""
    chunk_timeout: float | None = Field(default=None, gt=0)
    """Seconds one chunk may run. The process executor kills its worker and retries the
    chunk, Dask abandons the attempt and retries it; a thread cannot be stopped, so under
    ``thread`` and ``serial`` the run fails at once naming the chunk (exit 1) and leaves
    the thread behind (the process still exits)."""
    stall_timeout: float = Field(default=60.0, gt=0)
    """Seconds with chunks in flight, no worker on any of them and no attempt started or
    ended, before the watchdog resubmits them (each a failed attempt: past ``max_attempts``
    the run fails naming the chunk). Guards against a lost chunk: a run never waits forever."""
    dask: DaskConfig = DaskConfig()
    """With ``executor = "dask"``: where the cluster is."""
    base_dir: Path = Path(".")
    """Folder made importable for ``python`` steps (the job file's folder; set by the loader)."""


# -------------------------------------------------------------------------- output


class OutputConfig(Model):
    path: Path | str
    """Output folder, or an object-store URL (``s3://bucket/prefix``, a ``str``); published
    only when every chunk succeeded."""

    @field_validator("path", mode="before")
    @classmethod
    def _path_or_url(cls, v: Any) -> Any:
        # A URL stays a string: Path("s3://b/k") would collapse the "//".
        if isinstance(v, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", v) and not v.lower().startswith("file://"):
            return v
        return Path(v) if isinstance(v, str) else v

    format: Literal["parquet", "csv"] = "parquet"
    """File format of the parts. ``"delta"`` in the job file means Parquet parts committed
    as a Delta Lake table (sets ``table_format``)."""
    table_format: Literal["delta"] | None = None
    """``"delta"``: the output is a Delta Lake table (``etl.write.delta``); set it by
    writing ``format = "delta"``. None: a plain folder of parts."""

    @model_validator(mode="before")
    @classmethod
    def _delta_format(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("format") == "delta":
            return {**v, "format": "parquet", "table_format": "delta"}
        return v

    @model_validator(mode="after")
    def _delta_needs(self) -> OutputConfig:
        if self.table_format == "delta":
            if self.format != "parquet":
                raise ValueError("a Delta table holds Parquet files: drop output.format or set it to 'delta'")
            if importlib.util.find_spec("deltalake") is None:
                raise ValueError("output.format = 'delta' needs the deltalake package: pip install 'cronetl[delta]'")
        return self

    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    """Parquet compression codec."""
    partition_by: list[str] = []
    """Columns that become hive-style folders (``month=2026-01/``)."""
    mode: Literal["overwrite", "append"] = "overwrite"
    """``overwrite`` replaces the previous output; ``append`` adds new parts beside it."""
    writer_threads: int = Field(default=2, ge=1)
    """Threads writing finished parts to disk."""
    target_file_size: int = Field(default=128 << 20, ge=1 << 10)
    """Size an output file grows to (bytes, or a size like ``"128MiB"``): each partition's
    rows go into as few files as this allows; a file closes at the first row group that
    takes it to this size."""
    row_group_size: int = Field(default=131_072, ge=1)
    """Rows per Parquet row group (the last one of a file may hold fewer); every open file
    buffers up to this many rows. Ignored for CSV."""

    @field_validator("target_file_size", mode="before")
    @classmethod
    def _target_size(cls, v: Any) -> Any:
        return parse_size(v) if isinstance(v, str) else v


# ----------------------------------------------------------------------- resources


class ResourcesConfig(Model):
    memory_limit: str = "auto"
    """Memory budget: bytes (``4GiB``), a share of usable memory (``60%``) or ``auto``
    (half of usable memory, at most 512 MiB per usable CPU)."""

    @field_validator("memory_limit")
    @classmethod
    def _check_limit(cls, v: str) -> str:
        if v == "auto":
            return v
        if v.endswith("%"):
            pct = float(v[:-1])
            if not 0 < pct <= 100:
                raise ValueError(f"a percentage must be in (0, 100], got {v!r}")
            return v
        parse_size(v)
        return v


# -------------------------------------------------------------------------- checks

ColumnCheckName = Literal["not_null", "unique", "accepted_values", "min", "max"]
RunCheckName = Literal["min_rows", "max_rows", "max_rejected", "max_drop", "not_empty"]
CheckValue = bool | int | float | str


class ColumnChecks(Model):
    not_null: bool = False
    """Every row has a value in this column."""
    unique: bool = False
    """No value appears twice in this run's output (nulls ignored), across every file and chunk."""
    accepted_values: list[CheckValue] | None = Field(default=None, min_length=1)
    """The only values allowed (nulls pass; add ``not_null``)."""
    min: CheckValue | None = None
    """Smallest allowed value (inclusive; a string is parsed for timestamp and date columns)."""
    max: CheckValue | None = None
    """Largest allowed value (inclusive)."""
    warn: list[ColumnCheckName] = []
    """Checks of this column that only warn: logged and reported, and the run still publishes."""


class ExpectCheck(Model):
    expr: str = Field(min_length=1)
    """An expression (the ``filter`` language) that must be true on every output row; a row
    where it is false or null fails."""
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$")
    """Name in reports and metrics (default: the expression's position, ``expect[0]``)."""
    warn: bool = False
    """Only warn: logged and reported, and the run still publishes."""


_ARROW_ALIASES = {
    "float64": "double",
    "float32": "float",
    "float16": "halffloat",
    "str": "string",
    "utf8": "string",
    "large_string": "string",
    "large_utf8": "string",
    "boolean": "bool",
}


def arrow_type_name(name: str) -> str:
    """An Arrow type name in one spelling: ``float64`` → ``double``; a category as its values."""
    name = name.strip()
    if name.startswith("dictionary<values="):
        name = name[len("dictionary<values=") :].split(",", 1)[0]
    return _ARROW_ALIASES.get(name, name)


class SchemaContract(Model):
    columns: dict[str, str] = Field(min_length=1)
    """Expected output columns and their Arrow types (``int64``, ``double``, ``string``,
    ``timestamp[us]``, ``bool``, ``date32``; ``float64`` and ``str`` are accepted aliases)."""
    allow_extra: bool = False
    """Output columns not listed are allowed."""
    on_drift: Literal["fail", "warn"] = "fail"
    """A missing, extra or retyped column fails the run, or only warns."""


class ChecksConfig(Model):
    columns: dict[str, ColumnChecks] = {}
    """Row checks per output column, run in the workers on every chunk's output."""
    expect: list[ExpectCheck] = []
    """Expressions that must hold on every output row."""
    min_rows: int | None = Field(default=None, ge=0)
    """Fewest rows the run may publish (overwrite: the whole output; append: this run's rows)."""
    max_rows: int | None = Field(default=None, ge=0)
    """Most rows the run may publish (same count as ``min_rows``)."""
    max_rejected: Annotated[float, Field(ge=0, le=1)] | None = None
    """Largest share of rows read that may be rejected (``"1%"`` or 0.01), with ``on_error``
    ``skip`` or ``quarantine``."""
    max_drop: Annotated[float, Field(ge=0, le=1)] | None = None
    """Largest fall in published rows against the last successful run (``"50%"``)."""
    schema_: SchemaContract | None = Field(default=None, alias="schema")
    """The output's expected columns and types, and what to do on drift."""
    allow_empty: bool = False
    """Let a run that read rows publish none over a non-empty previous output (otherwise it
    fails the ``not_empty`` check, which needs no configuration)."""
    warn: list[RunCheckName] = []
    """Run checks that only warn: logged and reported, and the run still publishes."""

    _parse_shares = field_validator("max_rejected", "max_drop", mode="before")(parse_share)

    @property
    def row_checks(self) -> bool:
        """True when the workers have anything to check."""
        return bool(self.columns or self.expect or self.schema_)


# ----------------------------------------------------------------------------- job


class JobConfig(Model):
    job: JobSection
    """The job's name and its state folder (lock, manifest, reports)."""
    sources: SourcesSection
    """What to fetch: URLs, local paths, globs, object-store URLs."""
    download: DownloadConfig = DownloadConfig()
    """Download concurrency, timeouts, retries and headers."""
    read: ReadConfig = ReadConfig()
    """How files are cut into chunks and parsed."""
    transform: TransformConfig = TransformConfig()
    """The steps, and where and how they run."""
    output: OutputConfig
    """Where and how the result is published."""
    resources: ResourcesConfig = ResourcesConfig()
    """The memory budget the run sizes itself to."""
    checks: ChecksConfig = ChecksConfig()
    """Checks on the run's output rows before it is published."""
    base_dir: Path = Path(".")
    """Folder of the job file; relative paths resolve against it (set by the loader)."""
    file: Path = Path("job.toml")
    """The job file itself (set by the loader, for error messages)."""

    @property
    def job_state_dir(self) -> Path:
        return self.job.state_dir / self.job.name

    @property
    def staging_dir(self) -> Path:
        """Where downloads are staged (``<state_dir>/<job>/staging/<source name>``)."""
        return self.job_state_dir / "staging"


# --------------------------------------------------------------------------- loading

LOADER_KEYS = frozenset({"base_dir", "file"})
"""Keys the loader sets itself; never written in a job file, left out of the JSON Schema."""


def load_job(
    path: str | Path, overrides: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> JobConfig:
    """Read, override, resolve and validate a job file. Raises ``ConfigError``."""
    return load_job_explained(path, overrides, environ)[0]


def load_job_explained(
    path: str | Path, overrides: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[JobConfig, dict[str, str]]:
    """``load_job`` plus where each overridden key came from (``{"transform.workers":
    "environment ETL__TRANSFORM__WORKERS"}``); ``explain`` turns both into lines.

    Precedence: the job file < ``ETL__SECTION__KEY`` environment variables < ``--set``.
    Every problem (bad overrides, unset ``${VARS}``, every invalid key) is collected and
    raised as one ``ConfigError``."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    raw, origins, problems = jobfile.read_raw(path, overrides or [], environ, tags=STEP_OPS)
    base = path.resolve().parent
    raw["base_dir"] = str(base)
    raw["file"] = str(path)
    if isinstance(raw.get("transform", {}), dict):
        raw.setdefault("transform", {})["base_dir"] = str(base)
    cfg = jobfile.validate(JobConfig, raw, path, origins, problems, hidden=LOADER_KEYS, tags=STEP_OPS)
    return _resolve_paths(cfg, base), origins


def json_schema() -> dict[str, Any]:
    """The job file's JSON Schema (every key with its description), for editors."""
    return jobfile.json_schema(JobConfig, hidden=LOADER_KEYS, title="cronetl job file")


def explain(cfg: JobConfig, origins: dict[str, str], path: Path) -> list[str]:
    """Every resolved setting with where it came from: ``default``, ``job file``,
    ``environment ETL__…`` or ``--set``. Header values are redacted."""
    return jobfile.explain(cfg, origins, path, exclude={"base_dir": True, "file": True, "transform": {"base_dir"}})


def _resolve_paths(cfg: JobConfig, base: Path) -> JobConfig:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    steps = [
        s.model_copy(update={"path": rel(s.path)}) if isinstance(s, LookupStep) else s for s in cfg.transform.steps
    ]
    urls_file = cfg.sources.urls_file and rel(cfg.sources.urls_file)
    return cfg.model_copy(
        update={
            "job": cfg.job.model_copy(update={"state_dir": rel(cfg.job.state_dir)}),
            "sources": cfg.sources.model_copy(update={"urls_file": urls_file}),
            "transform": cfg.transform.model_copy(update={"steps": steps}),
            "output": cfg.output.model_copy(
                update={"path": rel(cfg.output.path) if isinstance(cfg.output.path, Path) else cfg.output.path}
            ),
        }
    )

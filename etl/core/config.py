"""The typed job model: one class per section of the job file, validated once at start-up.

``load_job(path, overrides)`` is the only entry point:

1. parse the TOML file (``tomllib``);
2. apply ``--set key.path=value`` overrides to the raw tables;
3. resolve ``${ENV_VAR}`` (and ``${ENV_VAR:-default}``) in every string;
4. validate into ``JobConfig``; unknown keys, wrong types and missing keys raise
   ``ConfigError`` naming the key path (``transform.steps[2].expr``) and the file;
5. resolve relative paths against the job file's folder.

Every model forbids unknown keys. Every model is plain, picklable data: the transform
stage sends ``TransformConfig`` to worker processes.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from etl.core.errors import ConfigError

_UNION_TAG = re.compile(r"^(constrained-\w+|int|float|str|bool|none|(literal|list|dict|function-\w+)\[.*\])$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    retry: Retry = Retry()
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
    | PythonStep,
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
    """Seconds one chunk may run before its worker is killed and the chunk retried."""
    dask: DaskConfig = DaskConfig()
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
    """File format of the parts."""
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    """Parquet compression codec."""
    partition_by: list[str] = []
    """Columns that become hive-style folders (``month=2026-01/``)."""
    mode: Literal["overwrite", "append"] = "overwrite"
    """``overwrite`` replaces the previous output; ``append`` adds new parts beside it."""
    writer_threads: int = Field(default=2, ge=1)
    """Threads writing finished parts to disk."""


# ----------------------------------------------------------------------- resources

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"4GiB"`` → 4294967296. Raises ValueError naming the value."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected a size like '512MiB' or '4GiB', got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


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


# ----------------------------------------------------------------------------- job


class JobConfig(Model):
    job: JobSection
    sources: SourcesSection
    download: DownloadConfig = DownloadConfig()
    read: ReadConfig = ReadConfig()
    transform: TransformConfig = TransformConfig()
    output: OutputConfig
    resources: ResourcesConfig = ResourcesConfig()
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


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override, resolve and validate a job file. Raises ``ConfigError``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("job file not found", file=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid TOML: {e}", file=str(path)) from None
    for item in overrides or []:
        apply_override(raw, item, file=str(path))
    raw = _resolve_env(raw, "", str(path))
    base = path.resolve().parent
    raw["base_dir"] = str(base)
    raw["file"] = str(path)
    raw.setdefault("transform", {})["base_dir"] = str(base)
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        # A misspelt key shows up twice (unknown + missing): the unknown one is the real news.
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        first = errors[0]
        raise ConfigError(_message(first), key=key_path(first["loc"]), file=str(path)) from None
    return _resolve_paths(cfg, base)


def apply_override(raw: dict[str, Any], item: str, *, file: str = "") -> None:
    """Apply one ``key.path=value`` (``transform.steps[0].expr=...``); value parsed as TOML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {item!r}", file=file)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string: --set output.format=csv
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        index: int | str = int(part) if part.isdigit() else part
        if isinstance(node, list):
            if not isinstance(index, int) or index >= len(node):
                raise ConfigError(f"--set: no list item {part!r}", key=key, file=file)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set: {part!r} is inside a value, not a table", key=key, file=file)
        if last:
            node[index] = value
        else:
            if isinstance(node, dict) and index not in node:
                node[index] = {}
            node = node[index]


def key_path(loc: tuple[Any, ...]) -> str:
    """Pydantic's ``loc`` as a job-file key path: ``transform.steps[2].expr``."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in STEP_OPS:
            pass  # the discriminated union adds the step's op to the path; the user never wrote it
        elif _UNION_TAG.match(part):
            pass  # likewise for a plain union's member type ("constrained-int", "literal['auto']")
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


def _message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; see the README's config reference)"
    if err["type"] == "missing":
        return "required key is missing"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{err['msg']}{shown}"


def _resolve_env(node: Any, where: str, file: str) -> Any:
    if isinstance(node, dict):
        return {k: _resolve_env(v, f"{where}.{k}" if where else k, file) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_env(v, f"{where}[{i}]", file) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable ${{{name}}} is not set", key=where, file=file)

        return _ENV_REF.sub(sub, node)
    return node


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

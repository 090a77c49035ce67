"""Delta Lake output (``output.format = "delta"``): the run's Parquet files, then one commit.

The folder and object-store writers (``etl.write.folder``, ``etl.write.objects``) produce
the run's Parquet files as they always do; these subclasses only change where the files
end up and what makes them visible: a single Delta commit, written by the ``deltalake``
package (the ``delta`` extra), instead of a rename or a manifest.

Layout::

    <table>/_delta_log/00000000000000000007.json       the commits (deltalake writes them)
    <table>/<run_id>/month=2026-01/part-….parquet      a run's data files (run ids are unique,
                                                       so no run ever overwrites another's file)
    <table>/<run_id>/_rejected/rejected-….jsonl        its dead-letter rows (not in the table)
    <table>/_cronetl_commits/<run_id>.json             object stores: a commit in progress

Readers follow ``_delta_log`` only, so files of a run that has not committed are
invisible. A run's commit (``publish``) holds every data file of the run: in ``append``
mode it adds them; in ``overwrite`` mode it also removes every file the table held (they
stay on disk for time travel until ``VACUUM``). Partition columns (``output.partition_by``)
become the table's partition columns; their values come from the hive folders the files
are in, and their types are inferred from the values (see ``partition_type``) unless the
table exists, whose types are kept.

Crash safety: the commit is a *plan* (``_Plan``: the files, their sizes, rows and
partition values, the schema) written before ``deltalake`` is called, and rolled forward
by ``clean_leftovers`` if the run dies after writing it. Rolling forward is idempotent:
files already in the table are not added twice. So once the plan exists, the run counts as
published (as ``etl.run.state`` assumes once the temp folder is gone); before, nothing is.

* Local tables: parts are written to the usual private temp folder (so a killed run is
  resumed as for folders, ``etl.run.state``), hard-linked into ``<table>/<run_id>/`` at
  publish, the plan is saved in the temp folder and the folder renamed to
  ``.<name>.commit-<run_id>`` (the publish point), then committed and removed.
* Object stores (``s3://``): parts are uploaded to ``<table>/<run_id>/`` as they are
  written; the plan is one PUT under ``_cronetl_commits/``, deleted after the commit. A
  killed run's files are left behind, unreferenced, for ``VACUUM``; its sources are
  processed again, as for object-store folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from etl.core import durable
from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.objstore import filesystem, store_errors
from etl.core.parts import HIVE_NULL, REJECTS_DIR
from etl.write.folder import OutputWriter
from etl.write.objects import ObjectOutputWriter

log = logging.getLogger("etl.delta")

DELTA_LOG = "_delta_log"
PLANS_DIR = "_cronetl_commits"  # object stores: plans of commits in progress
PLAN_FILE = ".delta-commit.json"  # local tables: the plan, in the renamed temp folder
RUN_ID_KEY = "cronetl.run_id"  # in each commit's commitInfo: which run wrote it
# Schemes the deltalake package reaches natively (object_store); other fsspec URLs cannot hold a table.
DELTA_SCHEMES = frozenset({"s3", "s3a", "gs", "az", "abfs", "abfss"})
_INT = re.compile(r"^-?(0|[1-9][0-9]{0,17})$")  # canonical, fits int64: "007" stays a string
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def open_delta_writer(out: OutputConfig, run_id: str, adopt: Path | None = None) -> OutputWriter:
    """The Delta writer for ``out.path``: a local table, or one on an object store."""
    if isinstance(out.path, str):
        return ObjectDeltaWriter(out, run_id, adopt)
    return DeltaWriter(out, run_id, adopt)


def clean_delta_leftovers(out: OutputConfig, keep: Path | None = None) -> list[Any]:
    """Roll forward commits a dead run planned, then remove what dead runs left."""
    if isinstance(out.path, str):
        return ObjectDeltaWriter.clean_leftovers(out, keep)
    return DeltaWriter.clean_leftovers(out, keep)


# --------------------------------------------------------------------------- the plan


@dataclass
class _File:
    path: str
    """Relative to the table root: ``<run_id>/month=2026-01/part-00000.parquet``."""
    size: int
    rows: int
    partition_values: dict[str, str | None]


@dataclass
class _Plan:
    """One run's commit, complete enough to be made by a later process."""

    run_id: str
    mode: str
    partition_by: list[str]
    schema: str  # the Delta schema as JSON, partition columns included
    files: list[_File]

    def dump(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def load(cls, data: bytes) -> _Plan:
        raw = json.loads(data)
        return cls(raw["run_id"], raw["mode"], raw["partition_by"], raw["schema"], [_File(**f) for f in raw["files"]])


def _deltalake() -> Any:
    try:
        import deltalake
        import deltalake.transaction
    except ImportError:
        raise OutputError(
            "output.format = 'delta' needs the deltalake package: pip install 'cronetl[delta]'", item="output.format"
        ) from None
    return deltalake


def _errors() -> tuple[type[BaseException], ...]:
    from deltalake.exceptions import DeltaError

    return (DeltaError, OSError, ValueError, TypeError)


def make_plan(
    out: OutputConfig,
    run_id: str,
    files: list[tuple[str, int, int, pa.Schema]],
    table: Any | None,
    item: str,
) -> _Plan:
    """The commit of ``files`` ((path in the table, bytes, rows, Parquet schema) each) into
    ``table`` (a ``DeltaTable``, None when there is none yet)."""
    dl = _deltalake()
    by = list(out.partition_by)
    entries = [_File(p, size, rows, partition_values(p, by, item)) for p, size, rows, _ in files]
    if table is not None:
        have = list(table.metadata().partition_columns)
        if have != by:
            raise OutputError(
                f"the table is partitioned by {have or 'nothing'}, output.partition_by says {by or 'nothing'}; "
                "write to a new path or change output.partition_by",
                item=item,
            )
    data = _data_schema([s for *_, s in files], item)
    if table is not None and (out.mode == "append" or not files):
        schema = table.schema()
        _check_fits(data, schema, item)
        return _Plan(run_id, out.mode, by, schema.to_json(), entries)
    existing = {f.name: f for f in table.schema().fields} if table is not None else {}
    fields = list(_delta_fields(pa.schema([f for f in data if f.name not in by]), item))
    for col in by:
        if col in data.names:
            raise OutputError(f"partition column {col!r} is also inside the data files", item=item)
        inferred = pa.schema([pa.field(col, partition_type([f.partition_values[col] for f in entries]))])
        fields.append(existing.get(col) or _delta_fields(inferred, item)[0])
    schema = dl.Schema(fields)
    return _Plan(run_id, out.mode, by, schema.to_json(), entries)


def commit(uri: str, options: dict[str, str], plan: _Plan, item: str) -> int | None:
    """Make ``plan`` the table's next version; returns it, or None when there was nothing to
    do (every file already in the table: a plan rolled forward twice; or an empty append)."""
    dl = _deltalake()
    from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

    now = int(time.time() * 1000)
    adds = [
        AddAction(f.path, f.size, f.partition_values, now, True, json.dumps({"numRecords": f.rows})) for f in plan.files
    ]
    props = CommitProperties(custom_metadata={RUN_ID_KEY: plan.run_id})
    try:
        schema = dl.Schema.from_json(plan.schema)
        table = open_table(uri, options)
        if table is None and not adds:
            return None  # no rows and no table: a table needs a schema, which comes from files
        if table is None:
            create_table_with_add_actions(
                uri, schema, adds, mode="error", partition_by=plan.partition_by,
                storage_options=options, commit_properties=props,
            )  # fmt: skip
            return 0
        paths = {f.path for f in plan.files}
        if paths <= active_files(table) and (paths or plan.mode == "append"):
            return None
        table.create_write_transaction(
            adds, mode=plan.mode, schema=schema, partition_by=plan.partition_by or None, commit_properties=props
        )
    except OutputError:
        raise
    except _errors() as e:
        raise OutputError(f"cannot commit to the Delta table: {type(e).__name__}: {e}", item=item) from e
    try:
        table.update_incremental()  # the handle still shows the version it was opened at
        return int(table.version())
    except _errors() as e:  # committed all the same
        log.warning("committed, but could not read the new version back: %s", e)
        return None


def landed(uri: str, options: dict[str, str], plan: _Plan) -> bool | None:
    """After ``commit`` raised: is the plan in the table all the same (deltalake can fail
    after writing the commit, e.g. in a post-commit hook)? None: cannot tell (the store
    does not answer). A plan without files cannot be told apart: False."""
    paths = {f.path for f in plan.files}
    if not paths:
        return False
    try:
        table = open_table(uri, options)
        return table is not None and paths <= active_files(table)
    except _errors() as e:
        log.warning("cannot tell whether the commit was made: %s", e)
        return None


def open_table(uri: str, options: dict[str, str]) -> Any | None:
    """The ``DeltaTable`` at ``uri``, or None when there is no table there yet."""
    dl = _deltalake()
    from deltalake.exceptions import TableNotFoundError

    try:
        return dl.DeltaTable(uri, storage_options=options or None)
    except TableNotFoundError:
        return None


def active_files(table: Any) -> set[str]:
    """Paths (relative to the table) of the files in the table's current version."""
    return set(table.get_add_actions().column("path").to_pylist())


def partition_values(relpath: str, columns: list[str], item: str) -> dict[str, str | None]:
    """``<run>/month=2026-01/zone=7/part.parquet`` → ``{"month": "2026-01", "zone": "7"}``;
    Hive's percent-encoding undone, ``HIVE_NULL`` → None."""
    found: dict[str, str | None] = {}
    for segment in PurePosixPath(relpath).parts[:-1]:
        key, eq, value = segment.partition("=")
        if eq and unquote(key) in columns:
            text = unquote(value)
            found[unquote(key)] = None if text == HIVE_NULL else text
    if set(found) != set(columns):
        raise OutputError(f"file is not in a folder for each of output.partition_by {columns}", item=relpath)
    return found


def partition_type(values: list[str | None]) -> pa.DataType:
    """The type of a new table's partition column, from its values (the files do not hold
    it): int64 when every value is a canonical integer, bool for true/false, date for ISO
    dates, else string. A zero-padded code ("007") stays a string."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    if all(_INT.match(v) for v in present):
        return pa.int64()
    if all(v in ("true", "false") for v in present):
        return pa.bool_()
    if all(_DATE.match(v) and _is_date(v) for v in present):
        return pa.date32()
    return pa.string()


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _data_schema(schemas: list[pa.Schema], item: str) -> pa.Schema:
    """One schema for every data file (a column null in some files takes the others' type)."""
    if not schemas:
        return pa.schema([])
    distinct = list({s.remove_metadata().to_string(): s.remove_metadata() for s in schemas}.values())
    try:
        merged = pa.unify_schemas(distinct, promote_options="permissive") if len(distinct) > 1 else distinct[0]
    except (pa.ArrowException, ValueError) as e:
        raise OutputError(f"the run's files disagree on the schema: {e}", item=item) from e
    return pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in merged])


def _delta_fields(schema: pa.Schema, item: str) -> list[Any]:
    try:
        return list(_deltalake().Schema.from_arrow(schema).fields)
    except _errors() as e:
        raise OutputError(f"the data's schema has no Delta equivalent: {e}", item=item) from e


def _check_fits(data: pa.Schema, schema: Any, item: str) -> None:
    """Appended files must have the table's columns, with the table's types."""
    table_fields = {f.name: f for f in schema.fields}
    for field in data:
        if pa.types.is_null(field.type):
            continue
        have = table_fields.get(field.name)
        if have is None:
            raise OutputError(
                f"column {field.name!r} is not in the table (its columns: {', '.join(table_fields)}); "
                "append cannot change a table's schema: use mode = 'overwrite' or a new path",
                item=item,
            )
        mine = _delta_fields(pa.schema([field]), item)[0].type
        if mine.to_json() != have.type.to_json():
            raise OutputError(
                f"column {field.name!r} is {mine.to_json()} in this run and {have.type.to_json()} in the table; "
                "append cannot change a table's schema: cast it, or use mode = 'overwrite'",
                item=item,
            )


def _is_data(relpath: str) -> bool:
    parts = PurePosixPath(relpath).parts
    return relpath.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in parts)


# --------------------------------------------------------------------------- local tables


class DeltaWriter(OutputWriter):
    """A local Delta table: the folder writer's temp folder, then links and one commit."""

    def __init__(self, out: OutputConfig, run_id: str, adopt: Path | None = None) -> None:
        _deltalake()
        if Path(out.path).is_dir() and any(Path(out.path).iterdir()) and not (Path(out.path) / DELTA_LOG).is_dir():
            raise OutputError(
                "output.format is 'delta' but the folder holds files and no _delta_log: "
                "a plain output folder is never turned into a table; use a new path",
                item=str(out.path),
            )
        super().__init__(out, run_id, adopt)
        self.uri = str(Path(out.path).absolute())
        self.run_dir = Path(out.path) / run_id
        self._keep_files = False  # a commit whose outcome is unknown may reference them

    def publish(self) -> list[str]:
        """Link the run's files into the table and commit them; returns the files committed
        (relative to the table). On ``OutputError`` nothing was committed."""
        self._finish("publish")  # every file in the temp folder was fsynced when written
        started = time.perf_counter()
        relpaths = sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*") if p.is_file())
        files = []
        for relpath in relpaths:
            if _is_data(relpath) or relpath.startswith(f"{REJECTS_DIR}/"):
                self._link(relpath)
            if _is_data(relpath):
                meta = _footer(self.tmp / relpath)
                files.append((f"{self.run_id}/{relpath}", (self.tmp / relpath).stat().st_size, meta[0], meta[1]))
        try:
            for folder in sorted({p.parent for p in self.run_dir.rglob("*") if p.is_file()} | {self.target}):
                durable.fsync_dir(folder)
        except OSError as e:
            raise OutputError(f"cannot sync the table's folders: {e}", item=str(self.run_dir)) from e
        try:
            plan = make_plan(self.out, self.run_id, files, open_table(self.uri, {}), str(self.target))
        except _errors() as e:
            raise OutputError(f"cannot read the Delta table: {type(e).__name__}: {e}", item=str(self.target)) from e
        committing = _sibling(self.target, "commit", self.run_id)
        try:
            durable.write_bytes(self.tmp / PLAN_FILE, plan.dump())
            os.rename(self.tmp, committing)  # the publish point: the run counts as published
            durable.fsync_dir(self.target.parent)
        except OSError as e:
            (self.tmp / PLAN_FILE).unlink(missing_ok=True)
            raise OutputError(f"cannot save the commit plan: {e}", item=str(self.tmp)) from e
        try:
            version = commit(self.uri, {}, plan, str(self.target))
        except OutputError as e:
            made = landed(self.uri, {}, plan)
            if not made:
                self._keep_files = made is None  # maybe committed: never delete them
                (committing / PLAN_FILE).unlink(missing_ok=True)  # never rolled forward now
                try:
                    os.rename(committing, self.tmp)  # discard() removes it
                except OSError as undo:
                    log.warning("could not rename %s back: %s (clean_leftovers removes it)", committing, undo)
                raise
            log.warning("deltalake raised after committing (%s); the commit stands", e)
            version = None
        log.info(
            "committed %d file(s) as version %s of %s; publish took %.3f s",
            len(files),
            version,
            self.target,
            time.perf_counter() - started,
        )
        shutil.rmtree(committing, ignore_errors=True)  # a leftover is removed by clean_leftovers
        return [f[0] for f in files]

    def discard(self) -> None:
        """Remove the run's links from the table and its temp folder. Never raises."""
        if not self._keep_files:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        super().discard()

    @staticmethod
    def clean_leftovers(out: OutputConfig, keep: Path | None = None) -> list[Path]:
        """Roll forward a commit a dead run planned; remove dead runs' temp folders and the
        files they linked into the table (never committed: their temp folder still exists)."""
        target = Path(out.path)
        if not target.parent.is_dir():
            return []
        stem = f".{target.name}."
        handled: list[Path] = []
        for folder in sorted(target.parent.glob(f"{glob_escape(stem)}commit-*")):
            plan_file = folder / PLAN_FILE
            plan = _Plan.load(plan_file.read_bytes()) if plan_file.is_file() else None
            if plan is not None and all((target / f.path).is_file() for f in plan.files):
                version = commit(str(target.absolute()), {}, plan, str(target))
                log.warning(
                    "run %s died while committing; its commit was %s",
                    plan.run_id,
                    "already made" if version is None else f"made now (version {version})",
                )
            shutil.rmtree(folder, ignore_errors=True)
            handled.append(folder)
        for tmp in sorted(target.parent.glob(f"{glob_escape(stem)}tmp-*")):
            run_dir = target / tmp.name.removeprefix(f"{stem}tmp-")
            if run_dir.is_dir():
                shutil.rmtree(run_dir, ignore_errors=True)  # links made before a crash, never committed
                handled.append(run_dir)
        return handled + OutputWriter.clean_leftovers(out, keep)

    def _link(self, relpath: str) -> None:
        dest = self.run_dir / relpath
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(self.tmp / relpath, dest)
            except OSError:
                shutil.copy2(self.tmp / relpath, dest)
        except OSError as e:
            raise OutputError(f"cannot put the file into the table: {e}", item=str(dest)) from e


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def _sibling(target: Path, kind: str, run_id: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{run_id}"


def _footer(path: Path | Any) -> tuple[int, pa.Schema]:
    """(rows, schema) from a Parquet file's footer: a local path or an open file."""
    try:
        meta = pq.ParquetFile(path).metadata
        return meta.num_rows, meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        raise OutputError(f"cannot read the Parquet footer: {e}", item=str(path)) from e


# --------------------------------------------------------------------------- object stores


def delta_options(url: str) -> dict[str, str]:
    """``deltalake`` storage options from the environment, as ``etl.core.objstore`` reads
    it: credentials stay in the environment (the object_store crate reads them there);
    only a custom endpoint is passed, and plain http allowed for one (MinIO, moto)."""
    if not url.lower().startswith(("s3://", "s3a://")):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    options = {"AWS_ENDPOINT_URL": endpoint}
    if endpoint.lower().startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    return options


class ObjectDeltaWriter(ObjectOutputWriter):
    """A Delta table on an object store: parts uploaded under ``<table>/<run_id>/``, then a
    plan object and one commit."""

    def __init__(self, out: OutputConfig, run_id: str, adopt: Path | None = None) -> None:
        _deltalake()
        scheme = str(out.path).split("://", 1)[0].lower()
        if scheme not in DELTA_SCHEMES:
            raise OutputError(
                f"a Delta table cannot live on {scheme}:// (deltalake reaches {', '.join(sorted(DELTA_SCHEMES))})",
                item=str(out.path),
            )
        super().__init__(out, run_id, adopt)
        self.prefix = run_id  # the run's files: <table>/<run_id>/...
        self.tmp = Path(f"{self.url}/{run_id}")
        self.uri = self.url.replace("s3a://", "s3://", 1)
        self.options = delta_options(self.url)
        self._keep_files = False  # a commit whose outcome is unknown may reference them

    def publish(self) -> list[str]:
        """Commit the uploaded files; returns them (relative to the table)."""
        if self._finished:
            raise OutputError("publish after publish or discard", item=self.url)
        self._finished = True
        started = time.perf_counter()
        local = getattr(self, "local", None)  # newer base writers spool pieces locally
        if isinstance(local, Path):
            shutil.rmtree(local, ignore_errors=True)
        mine = sorted(r for r in self._objects if _is_data(r))
        files = []
        for relpath in mine:
            rows, size = self._objects[relpath]
            path = f"{self.root}/{self.prefix}/{relpath}"
            try:
                with self.fs.open(path, "rb") as f:
                    schema = _footer(f)[1]
            except store_errors() as e:
                raise OutputError(f"cannot read the file back: {type(e).__name__}: {e}", item=path) from e
            files.append((f"{self.prefix}/{relpath}", size, rows, schema))
        try:
            plan = make_plan(self.out, self.run_id, files, open_table(self.uri, self.options), self.url)
        except _errors() as e:
            raise OutputError(f"cannot read the Delta table: {type(e).__name__}: {e}", item=self.url) from e
        plan_path = f"{self.root}/{PLANS_DIR}/{self.run_id}.json"
        self._call(self.fs.pipe_file, plan_path, plan.dump())  # the publish point
        try:
            version = commit(self.uri, self.options, plan, self.url)
        except OutputError as e:
            made = landed(self.uri, self.options, plan)
            if not made:
                self._keep_files = made is None  # maybe committed: never delete them
                self._forget_plan(plan_path)
                raise
            log.warning("deltalake raised after committing (%s); the commit stands", e)
            version = None
        log.info(
            "committed %d file(s) as version %s of %s; publish took %.3f s",
            len(files),
            version,
            self.url,
            time.perf_counter() - started,
        )
        self._forget_plan(plan_path)
        return [f[0] for f in files]

    def discard(self) -> None:
        """Delete this run's files (never committed). Never raises."""
        if self._keep_files:
            self._finished = True
            return
        super().discard()

    @staticmethod
    def clean_leftovers(out: OutputConfig, keep: Path | None = None) -> list[Any]:
        """Roll forward the commits dead runs planned. Their uncommitted files stay, never
        referenced, until ``VACUUM``."""
        url = str(out.path).rstrip("/")
        fs, root = filesystem(url, key="output.path")
        try:
            fs.invalidate_cache()
            plans = sorted(fs.ls(f"{root}/{PLANS_DIR}", detail=False))
        except FileNotFoundError:
            return []
        except store_errors() as e:
            raise OutputError(f"cannot list the output: {type(e).__name__}: {e}", item=url) from e
        handled = []
        for path in plans:
            try:
                plan = _Plan.load(fs.cat_file(path))
            except store_errors() + (ValueError, KeyError) as e:
                raise OutputError(f"cannot read a commit plan: {type(e).__name__}: {e}", item=path) from e
            if not all(fs.exists(f"{root}/{f.path}") for f in plan.files):
                log.warning("run %s planned a commit but its files are gone: not committing it", plan.run_id)
                fs.rm(path)
                continue
            version = commit(url.replace("s3a://", "s3://", 1), delta_options(url), plan, url)
            log.warning(
                "run %s died while committing; its commit was %s",
                plan.run_id,
                "already made" if version is None else f"made now (version {version})",
            )
            fs.rm(path)
            handled.append(f"{url}/{PLANS_DIR}/{path.rsplit('/', 1)[-1]}")
        return handled

    def _forget_plan(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass
        except store_errors() as e:  # rolled forward again next run: a no-op once committed
            log.warning("could not delete the commit plan %s: %s", path, e)

"""Run the transform steps of a job on one chunk: pure DataFrame -> DataFrame functions.

In: a chunk as a DataFrame whose index holds the source row numbers (a RangeIndex from
the chunk's ``row_start``), or for CSV parsed in the workers the file line each row starts
on (CSV/JSONL columns are strings, Parquet keeps its types), and
the job's steps (``etl.core.config.Step``). Out: ``apply_steps`` returns ``(result, rejects)``.
Steps never reorder rows and keep the index, so a row is named by its source row number
in every error and reject. ``validate_steps`` checks the steps once at start-up.

The cast types, the dtype each gives and how text is parsed: see ``etl.transform.casts``.

A *bad value* is a non-null value that cannot be converted. With ``on_error="fail"`` the
first one raises ``StepError`` naming column, row and value; otherwise its row is removed
and returned in ``rejects`` (columns ``_row``, ``_step``, ``_reason``, ``_raw``; ``_raw`` is
the row's input values as a JSON object). Filters and ``dropna`` drop rows; they are not
rejects. Any other failure raises ``StepError`` naming the step, with the cause chained.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from etl.core.config import (
    CastStep,
    DeriveStep,
    DropnaStep,
    DropStep,
    FillnaStep,
    FilterStep,
    LookupStep,
    ParseDatetimeStep,
    PythonStep,
    RenameStep,
    SelectStep,
    SqlStep,
    Step,
)
from etl.core.errors import ConfigError, ExitCode, StepError
from etl.transform.casts import _Problem, cast_column
from etl.transform.expr import ExprError, check_expr, compile_expr, to_arrow

_LOOKUP_CACHE = 16  # lookup tables kept per process; a job has a handful, each small

# A step's bad values: a row mask and, per row, the reason (None where the row is fine).
Bad = tuple[np.ndarray, np.ndarray]


# ------------------------------------------------------------------------------ apply


def apply_steps(
    df: pd.DataFrame,
    steps: Sequence[Step],
    *,
    base_dir: Path,
    on_error: str = "fail",
    label: str = "",
    unit: str = "row",
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Run steps in order. Returns (result, rejects); rejects is None when no row was rejected.
    ``unit`` says what the index numbers: a data ``row`` or the file ``line`` a row starts on."""
    original = df
    rejects: list[pd.DataFrame] = []
    for i, step in enumerate(steps):
        where = f"transform.steps[{i}] ({step.op})"
        try:
            df, bad = _RUNNERS[type(step)](df, step, Path(base_dir))
        except _BadQuery as e:  # the job's query does not fit the data: a job-file error, exit 2
            err = StepError(f"{e} (key transform.steps[{i}].query)", item=label, step=where)
            err.exit_code = ExitCode.BAD_CONFIG
            raise err from None
        except _Problem as e:
            raise StepError(str(e), item=label, step=where) from e.__cause__
        except ExprError as e:
            raise StepError(str(e), item=label, step=where) from e
        except Exception as e:
            raise StepError(f"{type(e).__name__}: {e}", item=label, step=where) from e
        if bad is None or not bad[0].any():
            continue
        mask, reasons = bad
        if on_error == "fail":
            first = int(np.argmax(mask))
            raise StepError(f"{reasons[first]} at {unit} {df.index[first]}", item=label, step=where)
        rejects.append(_rejects(original, df.index[mask], reasons[mask], where))
        df = df[~mask]
    return df, (pd.concat(rejects, ignore_index=True) if rejects else None)


def _rejects(original: pd.DataFrame, rows: pd.Index, reasons: np.ndarray, where: str) -> pd.DataFrame:
    known = rows.isin(original.index)  # a python step may have changed the index
    raws = iter(_json_row(r) for r in original.loc[rows[known]].to_dict(orient="records"))
    return pd.DataFrame(
        {
            "_row": pd.array(np.asarray(rows, dtype=np.int64), dtype=pd.ArrowDtype(pa.int64())),
            "_step": pd.array([where] * len(rows), dtype=pd.ArrowDtype(pa.string())),
            "_reason": pd.array(list(reasons), dtype=pd.ArrowDtype(pa.string())),
            "_raw": pd.array([next(raws) if k else None for k in known], dtype=pd.ArrowDtype(pa.string())),
        }
    )


def _json_row(record: dict[Any, Any]) -> str:
    return json.dumps({str(k): _plain(v) for k, v in record.items()}, ensure_ascii=False, default=str)


def _plain(v: Any) -> Any:
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (dt.date, dt.datetime, pd.Timestamp)):
        return v.isoformat()
    return v.item() if isinstance(v, np.generic) else v


def _need(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        available = ", ".join(map(str, df.columns))
        raise _Problem(f"unknown column {missing[0]!r}; available columns: {available}")


# ---------------------------------------------------------------------------- columns


def _select(df: pd.DataFrame, step: SelectStep, _: Path) -> tuple[pd.DataFrame, None]:
    _need(df, step.columns)
    return df[list(step.columns)], None


def _drop(df: pd.DataFrame, step: DropStep, _: Path) -> tuple[pd.DataFrame, None]:
    _need(df, step.columns)
    return df.drop(columns=list(step.columns)), None


def _rename(df: pd.DataFrame, step: RenameStep, _: Path) -> tuple[pd.DataFrame, None]:
    _need(df, list(step.columns))
    names = [step.columns.get(c, c) for c in df.columns]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise _Problem(f"renaming would give two columns named {twice!r}")
    return df.rename(columns=step.columns), None


def _fillna(df: pd.DataFrame, step: FillnaStep, _: Path) -> tuple[pd.DataFrame, None]:
    _need(df, list(step.values))
    out = df.copy(deep=False)
    for col, value in step.values.items():
        target = to_arrow(out[col].iloc[:0]).type
        try:  # a safe cast refuses lossy fills such as 0.5 into an integer column
            fill = pa.scalar(value).cast(target).as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise _Problem(f"cannot fill nulls of column {col!r} ({out[col].dtype}) with {value!r}: {e}") from e
        filled = out[col].fillna(fill)
        if filled.dtype != out[col].dtype:
            raise _Problem(f"filling column {col!r} ({out[col].dtype}) with {value!r} would change its type")
        out[col] = filled
    return out, None


def _dropna(df: pd.DataFrame, step: DropnaStep, _: Path) -> tuple[pd.DataFrame, None]:
    _need(df, step.columns or [])
    return df.dropna(subset=step.columns, how=step.how), None


# ------------------------------------------------------------------------ expressions


def _filter(df: pd.DataFrame, step: FilterStep, _: Path) -> tuple[pd.DataFrame, None]:
    return df[compile_expr(step.expr).mask(df)], None


def _derive(df: pd.DataFrame, step: DeriveStep, _: Path) -> tuple[pd.DataFrame, None]:
    out = df.copy(deep=False)
    for name, text in step.columns.items():
        value = compile_expr(text).evaluate(out)
        if not isinstance(value, pd.Series):  # a constant: the same value on every row
            value = pd.Series(pd.arrays.ArrowExtensionArray(pa.repeat(pa.scalar(value), len(out))), index=out.index)
        out[name] = value
    return out, None


# ------------------------------------------------------------------------------ casts


def _cast(df: pd.DataFrame, step: CastStep, _: Path) -> tuple[pd.DataFrame, Bad]:
    return _convert_all(df, {c: (k, step.format, False) for c, k in step.columns.items()})


def _parse_datetime(df: pd.DataFrame, step: ParseDatetimeStep, _: Path) -> tuple[pd.DataFrame, Bad]:
    return _convert_all(df, {c: ("timestamp", step.format, step.utc) for c in step.columns})


def _convert_all(df: pd.DataFrame, plan: dict[str, tuple[str, str | None, bool]]) -> tuple[pd.DataFrame, Bad]:
    _need(df, list(plan))
    out = df.copy(deep=False)
    reasons = np.full(len(df), None, dtype=object)
    seen = np.zeros(len(df), dtype=bool)  # rows with a reason (pd.isna on the reasons costs 1 ms per 100k rows)
    for col, (kind, fmt, utc) in plan.items():
        out[col], bad = cast_column(df[col], kind, fmt, utc=utc)
        if not bad.any():
            continue
        fresh = bad & ~seen  # a row keeps the reason of its first bad value
        seen |= bad
        shown = f"{kind} (format {fmt!r})" if fmt and kind in ("timestamp", "date") else kind
        reasons[fresh] = [f"column {col!r}: cannot cast {v!r} to {shown}" for v in df[col][fresh].tolist()]
    return out, (seen, reasons)


# ----------------------------------------------------------------------------- lookup


@functools.lru_cache(maxsize=_LOOKUP_CACHE)
def read_lookup_table(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    """Read a lookup table once per process; mtime and size in the key catch an edited file.

    Parquet keeps its types; CSV columns are read as text (like the inputs), so "007" stays.
    """
    if Path(path).suffix.lower() in (".parquet", ".pq"):
        table = pq.read_table(path)
    else:
        names = pacsv.open_csv(path).schema.names
        as_text = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, null_values=[""], strings_can_be_null=True
        )
        table = pacsv.read_csv(path, convert_options=as_text)
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def _table(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _Problem(f"lookup table not found: {path}") from None
    return str(path), st.st_mtime_ns, st.st_size


def _names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _keys(step: LookupStep) -> tuple[list[str], list[str]]:
    left = _names(step.on)
    right = left if step.right_on is None else _names(step.right_on)
    if len(left) != len(right):
        raise _Problem(f"'on' names {len(left)} key column(s) but 'right_on' names {len(right)}")
    return left, right


def _check_columns(table: pd.DataFrame, path: str, names: Sequence[str]) -> None:
    missing = [c for c in names if c not in table.columns]
    if missing:
        raise _Problem(f"lookup table {path} has no column {missing[0]!r}; it has: {', '.join(table.columns)}")


def _check_unique(table: pd.DataFrame, path: str, right: list[str]) -> None:
    keys = table[right].dropna()
    dup = keys[keys.duplicated()]
    if len(dup):
        key = tuple(dup.iloc[0]) if len(right) > 1 else dup.iloc[0, 0]
        raise _Problem(f"lookup table {path} has key {key!r} more than once; a join would repeat chunk rows")


@functools.lru_cache(maxsize=_LOOKUP_CACHE)
def _prepared(
    where: tuple[str, int, int], right: tuple[str, ...], dtypes: tuple[Any, ...]
) -> tuple[pd.Index, pd.DataFrame]:
    """The table's key index, with keys converted to the chunk's key dtypes (once per dtype)."""
    table = read_lookup_table(*where)
    _check_columns(table, where[0], right)
    _check_unique(table, where[0], list(right))
    table = table[table[list(right)].notna().all(axis=1)]  # a null key matches nothing
    keys = []
    for name, dtype in zip(right, dtypes):
        try:
            keys.append(table[name].astype(dtype))
        except (ValueError, TypeError, pa.ArrowException) as e:
            raise _Problem(
                f"lookup table {where[0]}: key column {name!r} ({table[name].dtype}) cannot be converted "
                f"to the chunk's key type {dtype}: {e}"
            ) from e
    index = pd.Index(keys[0]) if len(keys) == 1 else pd.MultiIndex.from_arrays(keys)
    return index, table


def _lookup(df: pd.DataFrame, step: LookupStep, base_dir: Path) -> tuple[pd.DataFrame, None]:
    left, right = _keys(step)
    _need(df, left)
    where = _table(step.path if step.path.is_absolute() else base_dir / step.path)
    index, table = _prepared(where, tuple(right), tuple(df[k].dtype for k in left))
    _check_columns(table, where[0], step.columns or [])
    bring = list(step.columns) if step.columns else [c for c in table.columns if c not in right]
    bring = [c for c in bring if c not in left or c not in right]  # a same-named key is already there
    clash = [c for c in bring if c in df.columns]
    if clash:
        raise _Problem(f"lookup would overwrite column {clash[0]!r}; drop or rename it first, or set 'columns'")
    probe = pd.Index(df[left[0]]) if len(left) == 1 else pd.MultiIndex.from_arrays([df[k] for k in left])
    rows = index.get_indexer(probe)  # -1 where the key is not in the table: null columns
    out = df.copy(deep=False)
    for col in bring:
        out[col] = pd.Series(table[col].array.take(rows, allow_fill=True), index=df.index)
    return out, None


# ----------------------------------------------------------------------------- python

_ADDED_TO_PATH: set[str] = set()


def load_function(spec: str, base_dir: Path) -> Callable[..., Any]:
    """Import ``module:function``, with ``base_dir`` importable. Raises ``_Problem``."""
    folder = str(Path(base_dir).resolve())
    if folder not in _ADDED_TO_PATH:
        if folder not in sys.path:
            sys.path.insert(0, folder)
        _ADDED_TO_PATH.add(folder)
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any error while importing user code: report it as the cause
        raise _Problem(f"cannot import {module_name!r} (from {folder}): {type(e).__name__}: {e}") from e
    fn: object = getattr(module, name, None)
    if not callable(fn):
        raise _Problem(f"module {module_name!r} has no function {name!r}")
    return fn


def _python(df: pd.DataFrame, step: PythonStep, base_dir: Path) -> tuple[pd.DataFrame, None]:
    fn = load_function(step.function, base_dir)
    result = fn(df.copy(deep=False), **step.params)  # a shallow copy: the caller's frame stays intact
    if not isinstance(result, pd.DataFrame):
        raise _Problem(f"{step.function} returned {type(result).__name__}, expected a pandas DataFrame")
    return result, None


# -------------------------------------------------------------------------------- sql

SQL_ROW = "__etl_row"  # the hidden column that carries each row's position through the query
_SQL_CACHE = 16  # planned queries kept per process; a job has a handful
# Functions that return a set of rows (a row would become many) or depend on more than
# the row: refused like aggregates. Aggregates come from DuckDB's own catalogue.
_SQL_NOT_ROW_WISE = frozenset({"unnest", "generate_series", "range", "nextval", "currval"})
_SQL_MODIFIERS = {"ORDER_MODIFIER": "ORDER BY", "LIMIT_MODIFIER": "LIMIT", "DISTINCT_MODIFIER": "DISTINCT"}


class _BadQuery(_Problem):
    """The query does not fit the chunk (an unknown column, a wrong type): a job-file error."""


@dataclass(frozen=True)
class SqlPlan:
    """A checked query, rewritten to carry ``SQL_ROW``, and which output columns are input
    columns passed through unchanged (taken from the chunk as they are, types included)."""

    text: str
    star: bool
    """A plain ``*`` (or ``chunk.*``): every input column passes, but ``star_except``."""
    star_except: frozenset[str]
    passed: frozenset[str]
    """Output columns that are a bare input column under its own name."""


@functools.cache
def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise _Problem("the sql step needs DuckDB: pip install 'cronetl[sql]'") from None
    return duckdb


_SQL_LOCAL = threading.local()


def _sql_connection() -> Any:
    """This worker's DuckDB connection (one per process, or per thread with the thread
    executor; a connection is not shared between threads): one DuckDB thread, as a worker
    is one core's worth of work."""
    con = getattr(_SQL_LOCAL, "con", None)
    if con is None:
        con = _SQL_LOCAL.con = _duckdb().connect(config={"threads": 1})
    return con


def _sql_value(sql: str, *params: Any) -> Any:
    """The one value a statement returns (fetched to the end: DuckDB refuses new work on a
    connection with an unfinished result)."""
    return _sql_connection().execute(sql, list(params)).fetchall()[0][0]


@functools.cache
def _aggregates() -> frozenset[str]:
    rows = _sql_connection().execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'"
    )
    return frozenset(r[0].lower() for r in rows.fetchall())


@functools.lru_cache(maxsize=_SQL_CACHE)
def sql_plan(query: str) -> SqlPlan:
    """Parse and check ``query`` (``_Problem`` naming what is not allowed) and rewrite it to
    carry ``SQL_ROW``. Checked on DuckDB's own syntax tree, not on the text."""
    tree = json.loads(_sql_value("SELECT json_serialize_sql(?)", query))
    if tree.get("error"):
        raise _Problem(f"not valid SQL: {tree.get('error_message', 'syntax error')}")
    if len(tree["statements"]) != 1:
        raise _Problem("expected one SELECT statement")
    node = tree["statements"][0]["node"]
    if node.get("type") != "SELECT_NODE":
        raise _Problem("expected one SELECT … FROM chunk (no UNION, INTERSECT, EXCEPT or VALUES)")
    _row_wise(node)
    alias = node["from_table"].get("alias") or "chunk"
    star, star_except, passed = False, set[str](), set[str]()
    for item in node["select_list"]:
        if item.get("class") == "STAR" and item.get("relation_name", "") in ("", alias) and not item.get("columns"):
            star = True
            item["exclude_list"] = [*item.get("exclude_list", []), SQL_ROW]
            star_except.update(str(x) for x in item["exclude_list"])
            star_except.update(str(r.get("key", r) if isinstance(r, dict) else r) for r in item.get("replace_list", []))
        elif (
            item.get("class") == "COLUMN_REF"
            and item["column_names"][-1:]
            and item.get("alias", "") in ("", item["column_names"][-1])
        ):
            passed.add(item["column_names"][-1])
    probe = json.loads(_sql_value("SELECT json_serialize_sql(?)", f"SELECT {SQL_ROW} FROM chunk"))
    node["select_list"].append(probe["statements"][0]["node"]["select_list"][0])
    text = _sql_value("SELECT json_deserialize_sql(?)", json.dumps(tree))
    return SqlPlan(str(text), star, frozenset(star_except), frozenset(passed))


def _row_wise(node: dict[str, Any]) -> None:
    """Refuse whatever makes a row's output depend on other rows, i.e. on chunk boundaries."""
    for m in node.get("modifiers", []):
        raise _Problem(f"{_SQL_MODIFIERS.get(m.get('type'), m.get('type'))} is not allowed: {_WHY}")
    if node.get("cte_map", {}).get("map"):
        raise _Problem(f"WITH is not allowed: {_WHY}")
    if node.get("group_expressions") or node.get("group_sets"):
        raise _Problem(f"GROUP BY is not allowed: {_WHY}")
    for clause in ("having", "qualify"):
        if node.get(clause):
            raise _Problem(f"{clause.upper()} is not allowed: {_WHY}")
    src = node.get("from_table") or {}
    if src.get("type") != "BASE_TABLE" or str(src.get("table_name", "")).lower() != "chunk" or src.get("schema_name"):
        raise _Problem("the query must read FROM chunk, and only chunk (no joins, other tables or table functions)")
    if src.get("sample"):
        raise _Problem(f"USING SAMPLE is not allowed: {_WHY}")
    aggregates = _aggregates()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            kind = x.get("class")
            if kind == "WINDOW":
                raise _Problem(f"window functions ({x.get('function_name', '')} OVER …) are not allowed: {_WHY}")
            if kind == "SUBQUERY":
                raise _Problem(f"subqueries are not allowed: {_WHY}")
            name = str(x.get("function_name", "")).lower()
            if kind == "FUNCTION" and (name in aggregates or name in _SQL_NOT_ROW_WISE):
                shown = "count" if name == "count_star" else name
                raise _Problem(f"{shown}() is not row-wise (an aggregate or a set of rows): {_WHY}")
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(node.get("select_list"))
    walk(node.get("where_clause"))


_WHY = "the sql step is row-wise, so its output never depends on where chunks are cut"


def _arrow_column(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """DuckDB's text types as the expression steps give them (``string``)."""
    if pa.types.is_large_string(values.type) or pa.types.is_string_view(values.type):
        return values.cast(pa.string())
    return values


def _sql(df: pd.DataFrame, step: SqlStep, _: Path) -> tuple[pd.DataFrame, None]:
    plan = sql_plan(step.query)
    duckdb = _duckdb()
    con = _sql_connection()
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise _Problem(f"cannot hand the chunk to DuckDB: {e}") from e
    table = table.append_column(SQL_ROW, pa.array(np.arange(len(df), dtype=np.int64)))
    con.register("chunk", table)
    try:
        result = con.sql(plan.text).to_arrow_table()
    except (duckdb.BinderException, duckdb.ConversionException) as e:
        columns = ", ".join(map(str, df.columns))
        said = str(e).split("\nLINE ")[0].strip()  # the LINE excerpt would show our rewritten query
        raise _BadQuery(f"{said} (the chunk's columns: {columns})") from None
    except duckdb.Error as e:
        raise _Problem(f"{type(e).__name__}: {str(e).strip()}") from None
    finally:
        con.unregister("chunk")
    names = result.column_names[:-1]  # the last is SQL_ROW, as the plan appended it
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise _BadQuery(f"the query gives two columns named {twice!r}; name them apart with AS")
    rows = result.column(len(names)).to_numpy()
    if len(rows) > 1 and not (np.diff(rows) > 0).all():  # DuckDB keeps the order with one thread; make sure
        order = np.argsort(rows, kind="stable")
        result, rows = result.take(order), rows[order]
    index = df.index[rows]
    out: dict[str, Any] = {}
    for i, name in enumerate(names):
        as_is = name in df.columns and (name in plan.passed or (plan.star and name not in plan.star_except))
        if as_is:
            out[name] = df[name].iloc[rows].set_axis(index)
        else:
            out[name] = pd.Series(pd.arrays.ArrowExtensionArray(_arrow_column(result.column(i))), index=index)
    return pd.DataFrame(out, index=index), None


_RUNNERS: dict[type, Callable[[pd.DataFrame, Any, Path], tuple[pd.DataFrame, Bad | None]]] = {
    SelectStep: _select,
    DropStep: _drop,
    RenameStep: _rename,
    CastStep: _cast,
    ParseDatetimeStep: _parse_datetime,
    FilterStep: _filter,
    DeriveStep: _derive,
    FillnaStep: _fillna,
    DropnaStep: _dropna,
    LookupStep: _lookup,
    PythonStep: _python,
    SqlStep: _sql,
}


# ------------------------------------------------------------------------- validation


# Casts whose typed CSV parse gives exactly the text path's values (``typed_columns``).
_TYPED_PARSE = {"float64": pa.float64(), "int64": pa.int64(), "Int64": pa.int64()}


def typed_columns(steps: Sequence[Step]) -> dict[str, pa.DataType]:
    """Columns a CSV chunk can be parsed straight into a type (``etl.core.chunks.parse_csv_chunk``):
    those whose first step is a cast to float64, int64 or Int64, among the leading steps
    that only select, drop and convert (a rename, fillna or expression could see the
    difference; later steps see the cast's output, the same either way). Arrow's CSV
    number parser is the one the cast uses (after the same trimming), so a value it
    accepts casts to the same value; a chunk with any value it refuses is parsed as text."""
    typed: dict[str, pa.DataType] = {}
    seen: set[str] = set()
    for step in steps:
        if isinstance(step, CastStep):
            for col, kind in step.columns.items():
                if col not in seen and kind in _TYPED_PARSE:
                    typed[col] = _TYPED_PARSE[kind]
                seen.add(col)
        elif isinstance(step, ParseDatetimeStep):
            seen.update(step.columns)
        elif not isinstance(step, (SelectStep, DropStep)):
            break
    return typed


def validate_steps(steps: Sequence[Step], base_dir: Path, *, file: str = "") -> None:
    """Compile every expression, import python functions, read lookup tables.

    Raises one ``ConfigError`` listing every offending setting (``transform.steps[2].expr``).
    """
    problems: list[tuple[str, str]] = []
    for i, step in enumerate(steps):
        for field, check in _checks(step, Path(base_dir)):
            try:
                check()
            except (ValueError, OSError, _Problem) as e:
                problems.append((f"transform.steps[{i}].{field}", f"{step.op} step: {e}"))
                if not isinstance(step, DeriveStep):
                    break  # a lookup's later checks need what the first one could not read
    if problems:  # every step's problem in one message
        key, message = problems[0]
        raise ConfigError(message, key=key, file=file, problems=problems)


def _checks(step: Step, base_dir: Path) -> list[tuple[str, Callable[[], Any]]]:
    if isinstance(step, FilterStep):
        return [("expr", lambda: check_expr(step.expr))]
    if isinstance(step, DeriveStep):
        return [(f"columns.{name}", functools.partial(check_expr, text)) for name, text in step.columns.items()]
    if isinstance(step, PythonStep):
        return [("function", lambda: load_function(step.function, base_dir))]
    if isinstance(step, SqlStep):
        return [("query", lambda: sql_plan(step.query))]
    if isinstance(step, LookupStep):
        path = step.path if step.path.is_absolute() else base_dir / step.path
        table: Callable[[], pd.DataFrame] = lambda: read_lookup_table(*_table(path))  # noqa: E731 - cached after the first call
        key = "right_on" if step.right_on is not None else "on"
        return [
            ("path", table),
            (key, lambda: _check_columns(table(), str(path), _keys(step)[1])),
            (key, lambda: _check_unique(table(), str(path), _keys(step)[1])),
            ("columns", lambda: _check_columns(table(), str(path), step.columns or [])),
        ]
    return []

"""Row checks (``[checks]``) on one chunk's output, run in the worker after the steps.

In: the transformed DataFrame (indexed by source row or file line, see ``etl.transform.steps``),
the validated ``ChecksConfig`` and the chunk's identity. Out: a ``ChunkChecks`` with, per
check, how many rows failed and up to ``MAX_CHECK_EXAMPLES`` of them (file, line or row,
and the values checked); for ``unique`` columns, the 128-bit hashes and row numbers of the
chunk's non-null values, which the parent tests across the whole run
(``etl.run.checks``); and the output's column types for the schema contract.

Every check is an expression of the ``filter`` language that picks the *failing* rows, so
nulls follow one rule: ``min``, ``max`` and ``accepted_values`` let nulls pass (a
comparison with null is null, not true); ``not_null`` catches them; an ``expect``
expression fails where it is false or null. Check names are what reports and metrics
show: ``not_null(id)``, ``unique(id)``, ``accepted_values(payment)``, ``min(fare)``,
``max(fare)``, ``expect[0]`` (or the expectation's ``name``), ``schema``.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from etl.core.config import ChecksConfig, CheckValue, arrow_type_name
from etl.core.errors import ConfigError, StepError
from etl.core.records import MAX_CHECK_EXAMPLES, CheckTally, ChunkChecks
from etl.transform.expr import Expr, ExprError, check_expr

# Two independent 64-bit hashes per value: a false duplicate among n values needs a
# 128-bit collision (~n^2 / 2^129), where one 64-bit hash would give ~3e-4 at 10^8 rows.
# Costs a second hashing pass over the unique columns only.
HASH_KEYS = ("cronetl-unique-1", "cronetl-unique-2")
SCHEMA_SAMPLE_ROWS = 1000  # rows the output's Arrow types are inferred from (object columns)


@dataclass(frozen=True)
class RowCheck:
    """One row check: its report name, its key path, the expression picking failing rows."""

    name: str
    key: str
    failing: Expr
    """True on the rows that fail (for an ``expect``, the expectation itself: see ``invert``)."""
    invert: bool
    """``failing`` is the expectation: rows where it is not true fail."""
    columns: tuple[str, ...]
    """Columns shown in examples."""
    warn: bool


def _col(name: str) -> str:
    return f"`{name}`"


def _lit(v: CheckValue) -> str:
    return repr(v)


def row_checks(cfg: ChecksConfig) -> tuple[RowCheck, ...]:
    """The row checks of ``cfg``, compiled once per worker (``unique`` is run-wide: not here)."""
    return _compiled(cfg.model_dump_json(by_alias=True))


@functools.lru_cache(maxsize=8)
def _compiled(text: str) -> tuple[RowCheck, ...]:
    cfg = ChecksConfig.model_validate_json(text)
    out: list[RowCheck] = []
    for col, c in cfg.columns.items():
        key = f"checks.columns.{col}"
        tests: list[tuple[str, str]] = []
        if c.not_null:
            tests.append(("not_null", f"isnull({_col(col)})"))
        if c.accepted_values is not None:
            values = ", ".join(_lit(v) for v in c.accepted_values)
            tests.append(("accepted_values", f"{_col(col)} not in ({values},)"))
        if c.min is not None:
            tests.append(("min", f"{_col(col)} < {_lit(c.min)}"))
        if c.max is not None:
            tests.append(("max", f"{_col(col)} > {_lit(c.max)}"))
        for kind, text in tests:
            out.append(RowCheck(f"{kind}({col})", f"{key}.{kind}", check_expr(text), False, (col,), kind in c.warn))
    for i, e in enumerate(cfg.expect):
        expr = check_expr(e.expr)
        cols = tuple(sorted(expr.columns))
        out.append(RowCheck(e.name or f"expect[{i}]", f"checks.expect[{i}].expr", expr, True, cols, e.warn))
    return tuple(out)


def validate_checks(cfg: ChecksConfig, file: str = "") -> None:
    """Start-up validation: every check compiles, names are unique. Raises ``ConfigError``."""
    for i, e in enumerate(cfg.expect):
        try:
            check_expr(e.expr)
        except ValueError as err:
            raise ConfigError(str(err), key=f"checks.expect[{i}].expr", file=file) from None
    try:
        names = [c.name for c in row_checks(cfg)]
    except ValueError as err:  # a min/max/accepted_values literal the language refuses
        raise ConfigError(str(err), key="checks.columns", file=file) from None
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"two checks are named {dupes[0]!r}; give each expect a distinct name", key="checks.expect")


def check_chunk(df: pd.DataFrame, cfg: ChecksConfig, source_name: str, unit: str, label: str) -> ChunkChecks:
    """Run every row check on ``df`` (one chunk's output). Raises ``StepError`` naming the
    check's key when one cannot be evaluated (a missing column, a wrong type)."""
    out = ChunkChecks(source_name, unit)
    for c in row_checks(cfg):
        try:
            mask = c.failing.mask(df)
        except ExprError as e:
            raise StepError(str(e), item=label, step=c.key) from None
        if c.invert:
            mask = ~mask
        n = int(mask.sum())
        positions = np.flatnonzero(mask)[:MAX_CHECK_EXAMPLES].tolist()
        out.tallies[c.name] = CheckTally(n, [_example(df, int(p), c.columns, source_name, unit) for p in positions])
    for col, cc in cfg.columns.items():
        if cc.unique:
            if col not in df.columns:
                raise StepError(f"unknown column {col!r}", item=label, step=f"checks.columns.{col}.unique")
            out.keys[col] = unique_keys(df[col])
    if cfg.schema_ is not None and len(df):
        sample = df.head(SCHEMA_SAMPLE_ROWS)
        schema = pa.Schema.from_pandas(sample, preserve_index=False)
        out.schema = tuple((f.name, arrow_type_name(str(f.type))) for f in schema)
    return out


def unique_keys(series: pd.Series) -> bytes:
    """The non-null values' 128-bit hashes (two uint64 per row) then their row numbers."""
    values = series[series.notna().to_numpy(dtype=bool, na_value=False)]
    h = [pd.util.hash_pandas_object(values, index=False, hash_key=k).to_numpy(np.uint64) for k in HASH_KEYS]
    rows: np.ndarray = values.index.to_numpy(dtype=np.int64)
    hashes: np.ndarray = np.column_stack(h).astype("<u8")
    return hashes.tobytes() + rows.astype("<i8").tobytes()


def _example(df: pd.DataFrame, pos: int, columns: tuple[str, ...], source: str, unit: str) -> dict[str, Any]:
    row = df.iloc[pos]
    values = {c: plain(row[c]) for c in columns if c in df.columns}
    return {"file": source, unit: int(df.index[pos]), "values": values}


def plain(v: Any) -> Any:
    """A value as JSON-friendly Python: None for every null, numbers, else its text."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (dt.datetime, dt.date, pd.Timestamp)):
        return v.isoformat()
    return str(v)

"""The functions of the expression language (``etl.transform.expr``), and the Arrow value helpers
its operators share with them.

``FUNCTIONS`` maps each allowed name (``minutes``, ``strftime``, ``where``, ...) to a
``_Func``: its implementation over Arrow values and the argument count and literal
arguments the compiler checks. The names, with an example each, are documented in the
``etl.transform.expr`` docstring (the language's one reference). An implementation raises
``_OpError`` for a value it cannot take; the evaluator adds the sub-expression and text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# A value during evaluation: a column-length array, or one scalar for all rows.
Value: TypeAlias = pa.ChunkedArray | pa.Scalar


class _OpError(Exception):
    """Raised inside an operation; the node wrapper adds the sub-expression and text."""


# ------------------------------------------------------------------------------ values


def _is_string(t: pa.DataType) -> bool:
    return cast(bool, pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_temporal(t: pa.DataType) -> bool:
    return cast(bool, pa.types.is_timestamp(t) or pa.types.is_date(t))


def _boolean(v: Value, op: str) -> Value:
    if pa.types.is_null(v.type):
        return v.cast(pa.bool_())
    if not pa.types.is_boolean(v.type):
        raise _OpError(f"'{op}' needs true/false values, got {v.type}")
    return v


def _coerce_literal(a: Value, b: Value) -> tuple[Value, Value]:
    """Give a string/None literal the type of the array it meets (timestamps are parsed)."""
    if isinstance(b, pa.Scalar) and not isinstance(a, pa.Scalar):
        b2, a2 = _coerce_literal(b, a)
        return a2, b2
    if not isinstance(a, pa.Scalar) or isinstance(b, pa.Scalar):
        return a, b
    if pa.types.is_null(a.type):
        return pa.scalar(None, b.type), b
    if _is_string(a.type) and _is_temporal(b.type):
        try:
            ts = pd.Timestamp(a.as_py())
        except ValueError as e:
            raise _OpError(f"{a.as_py()!r} is not a date/time: {e}") from None
        if pa.types.is_date(b.type):
            return pa.scalar(ts.date(), b.type), b
        tz = b.type.tz
        if tz is not None:
            ts = ts.tz_localize(tz) if ts.tzinfo is None else ts.tz_convert(tz)
        elif ts.tzinfo is not None:
            ts = ts.tz_convert("UTC").tz_localize(None)
        return pa.scalar(ts, b.type), b
    return a, b


# --------------------------------------------------------------------------- functions


@dataclass(frozen=True)
class _Func:
    impl: Callable[..., Value]
    min_args: int
    max_args: int
    literals: dict[int, type] = field(default_factory=dict)
    """Argument positions that must be literals of this type (formats, digits, patterns)."""


_SECONDS_PER_UNIT = {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _duration(unit_seconds: float, name: str) -> Callable[[Value], Value]:
    def run(x: Value) -> Value:
        if not pa.types.is_duration(x.type):
            raise _OpError(f"{name}() needs a time difference such as (dropoff - pickup), got {x.type}")
        factor = _SECONDS_PER_UNIT[x.type.unit] / unit_seconds
        return pc.multiply(x.cast(pa.int64()).cast(pa.float64()), factor)

    return run


def _field(kernel: str) -> Callable[[Value], Value]:
    def run(x: Value) -> Value:
        if not _is_temporal(x.type):
            raise _OpError(f"needs a timestamp or date, got {x.type}; parse it first (parse_datetime)")
        return getattr(pc, kernel)(x).cast(pa.int64())

    return run


def _date(x: Value) -> Value:
    if pa.types.is_date(x.type):
        return x
    if not pa.types.is_timestamp(x.type):
        raise _OpError(f"needs a timestamp, got {x.type}")
    return x.cast(pa.date32())


def _strftime(x: Value, fmt: str) -> Value:
    if not _is_temporal(x.type):
        raise _OpError(f"needs a timestamp or date, got {x.type}; parse it first (parse_datetime)")
    naive = pa.types.is_date(x.type) or (pa.types.is_timestamp(x.type) and x.type.tz is None)
    if fmt in _DATE_PREFIX and naive:
        # A prefix of the ISO date text: about 15x faster than pc.strftime, which formats
        # value by value.
        days = x.cast(pa.date32())
        if isinstance(days, pa.ChunkedArray):
            texts = [_date_texts(chunk, _DATE_PREFIX[fmt]) for chunk in days.chunks]
            if all(t is not None for t in texts):
                return pa.chunked_array(texts, pa.string())
        return pc.utf8_slice_codeunits(days.cast(pa.string()), 0, _DATE_PREFIX[fmt])
    return pc.strftime(x, format=fmt)


_DATE_PREFIX = {"%Y": 4, "%Y-%m": 7, "%Y-%m-%d": 10}  # strftime formats that are ISO-date prefixes
_SPAN_DAYS = 4096  # dates formatted once each per chunk when they span at most this many days (11 years)


def _date_texts(days: pa.Array, width: int) -> pa.Array | None:
    """The ISO date prefix of each date: Arrow formats each day of the chunk's span once
    and the values are taken from those texts by their day (a chunk's dates usually span
    days to years, not one text per row: 100k dates ~4 ms -> ~1 ms). The same texts as
    formatting every value; None when the dates span more than ``_SPAN_DAYS`` days."""
    if days.null_count == len(days):
        return pa.nulls(len(days), pa.string())
    first, last = pc.min_max(days).values()
    if (last.value - first.value) >= _SPAN_DAYS:
        return None
    span = pa.array(np.arange(first.value, last.value + 1, dtype=np.int32)).cast(pa.date32())
    texts = pc.utf8_slice_codeunits(span.cast(pa.string()), 0, width)
    return texts.take(pc.subtract(days.cast(pa.int32()), pa.scalar(first.value, pa.int32())))


def _isnull(x: Value) -> Value:
    return pc.is_null(x, nan_is_null=True)


def _round(x: Value, ndigits: int = 0) -> Value:
    return pc.round(x, ndigits=ndigits, round_mode="half_to_even")


def _where(cond: Value, a: Value, b: Value) -> Value:
    cond = pc.fill_null(_boolean(cond, "where"), False)
    a, b = _coerce_literal(a, b)
    return pc.if_else(cond, a, b)


def _coalesce(*args: Value) -> Value:
    typed = next((a.type for a in args if not pa.types.is_null(a.type)), pa.null())
    return pc.coalesce(*(a.cast(typed) if pa.types.is_null(a.type) else a for a in args))


def _clip(x: Value, lo: Value, hi: Value) -> Value:
    if not pa.types.is_null(lo.type):
        x = pc.max_element_wise(x, lo, skip_nulls=False)
    if not pa.types.is_null(hi.type):
        x = pc.min_element_wise(x, hi, skip_nulls=False)
    return x


def _int(x: Value) -> Value:
    if _is_string(x.type):
        return pc.utf8_trim_whitespace(x).cast(pa.int64())
    if pa.types.is_floating(x.type):
        x = pc.trunc(x)
    return x.cast(pa.int64())


def _float(x: Value) -> Value:
    return (pc.utf8_trim_whitespace(x) if _is_string(x.type) else x).cast(pa.float64())


def _contains(s: Value, sub: str) -> Value:
    return pc.match_substring(s, pattern=sub)


FUNCTIONS: dict[str, _Func] = {
    "minutes": _Func(_duration(60, "minutes"), 1, 1),
    "seconds": _Func(_duration(1, "seconds"), 1, 1),
    "hours": _Func(_duration(3600, "hours"), 1, 1),
    "days": _Func(_duration(86400, "days"), 1, 1),
    "strftime": _Func(_strftime, 2, 2, {1: str}),
    "year": _Func(_field("year"), 1, 1),
    "month": _Func(_field("month"), 1, 1),
    "day": _Func(_field("day"), 1, 1),
    "hour": _Func(_field("hour"), 1, 1),
    "weekday": _Func(_field("day_of_week"), 1, 1),
    "date": _Func(_date, 1, 1),
    "isnull": _Func(_isnull, 1, 1),
    "notnull": _Func(lambda x: pc.invert(_isnull(x)), 1, 1),
    "lower": _Func(pc.utf8_lower, 1, 1),
    "upper": _Func(pc.utf8_upper, 1, 1),
    "strip": _Func(pc.utf8_trim_whitespace, 1, 1),
    "len": _Func(lambda s: pc.utf8_length(s).cast(pa.int64()), 1, 1),
    "contains": _Func(_contains, 2, 2, {1: str}),
    "startswith": _Func(lambda s, p: pc.starts_with(s, pattern=p), 2, 2, {1: str}),
    "endswith": _Func(lambda s, p: pc.ends_with(s, pattern=p), 2, 2, {1: str}),
    "abs": _Func(pc.abs, 1, 1),
    "round": _Func(_round, 1, 2, {1: int}),
    "floor": _Func(pc.floor, 1, 1),
    "ceil": _Func(pc.ceil, 1, 1),
    "where": _Func(_where, 3, 3),
    "coalesce": _Func(_coalesce, 1, 16),
    "clip": _Func(_clip, 3, 3),
    "int": _Func(_int, 1, 1),
    "float": _Func(_float, 1, 1),
    "str": _Func(lambda x: x.cast(pa.string()), 1, 1),
}

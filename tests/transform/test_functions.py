"""Every function of the expression language, evaluated through ``compile_expr`` on a small frame.

Nulls propagate: a null input gives a null output, except where a function is about nulls
(``isnull``, ``notnull``, ``coalesce``) or documents otherwise (``where``: a null condition
picks the second value).
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from etl.transform.expr import ExprError, compile_expr
from etl.transform.functions import _SPAN_DAYS, FUNCTIONS

A = pd.ArrowDtype


@pytest.fixture
def df() -> pd.DataFrame:
    ts = pa.timestamp("us")
    return pd.DataFrame(
        {
            "pickup": pd.Series([dt.datetime(2026, 1, 5, 10, 0), dt.datetime(2026, 2, 28, 23, 30), None], dtype=A(ts)),
            "dropoff": pd.Series(
                [dt.datetime(2026, 1, 5, 10, 45), dt.datetime(2026, 3, 1, 1, 0), dt.datetime(2026, 1, 1)], dtype=A(ts)
            ),
            "day": pd.Series([dt.date(2026, 1, 4), None, dt.date(2026, 12, 31)], dtype=A(pa.date32())),
            "name": pd.Series(["  JFK Airport ", "la guardia", None], dtype=A(pa.string())),
            "x": pd.Series([-2.5, 3.7, None], dtype=A(pa.float64())),
            "n": pd.Series([-7, 12, None], dtype=A(pa.int64())),
            "tip": pd.Series([None, 1.0, None], dtype=A(pa.float64())),
            "extra": pd.Series([0.5, None, None], dtype=A(pa.float64())),
            "nan": pd.Series([float("nan"), 1.0, None]),  # numpy: NaN counts as null
            "flag": pd.Series([True, None, False], dtype=A(pa.bool_())),
            "num_text": pd.Series([" 12 ", "3.5", None], dtype=A(pa.string())),
        }
    )


def ev(expr: str, frame: pd.DataFrame) -> list[object]:
    out = compile_expr(expr).evaluate(frame)
    return [None if v is None or v is pd.NA else v for v in out.tolist()]


def dtype(expr: str, frame: pd.DataFrame) -> pa.DataType:
    return compile_expr(expr).evaluate(frame).dtype.pyarrow_dtype


# Every name in FUNCTIONS is exercised below; this keeps the list honest when one is added.
COVERED = {
    "minutes",
    "seconds",
    "hours",
    "days",
    "strftime",
    "year",
    "month",
    "day",
    "hour",
    "weekday",
    "date",
    "isnull",
    "notnull",
    "lower",
    "upper",
    "strip",
    "len",
    "contains",
    "startswith",
    "endswith",
    "abs",
    "round",
    "floor",
    "ceil",
    "where",
    "coalesce",
    "clip",
    "int",
    "float",
    "str",
}


def test_every_function_is_covered_here() -> None:
    assert set(FUNCTIONS) == COVERED


def test_durations(df: pd.DataFrame) -> None:
    assert ev("minutes(dropoff - pickup)", df) == [45.0, 90.0, None]
    assert ev("seconds(dropoff - pickup)", df) == [2700.0, 5400.0, None]
    assert ev("hours(dropoff - pickup)", df) == [0.75, 1.5, None]
    assert ev("days(dropoff - pickup)", df) == [0.75 / 24, 1.5 / 24, None]
    assert dtype("minutes(dropoff - pickup)", df) == pa.float64()


def test_duration_of_something_else_is_an_error(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError, match="time difference"):
        compile_expr("minutes(pickup)").evaluate(df)


def test_calendar_fields(df: pd.DataFrame) -> None:
    assert ev("year(pickup)", df) == [2026, 2026, None]
    assert ev("month(pickup)", df) == [1, 2, None]
    assert ev("day(pickup)", df) == [5, 28, None]
    assert ev("hour(pickup)", df) == [10, 23, None]
    assert ev("weekday(pickup)", df) == [0, 5, None]  # 2026-01-05 is a Monday, 2026-02-28 a Saturday
    assert ev("weekday(day)", df) == [6, None, 3]  # dates too: Sunday, null, Thursday
    for f in ("year", "month", "day", "hour", "weekday"):
        assert dtype(f"{f}(pickup)", df) == pa.int64()


def test_calendar_field_of_text_is_an_error(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError, match="parse it first"):
        compile_expr("year(name)").evaluate(df)


def test_date_and_strftime(df: pd.DataFrame) -> None:
    assert ev("date(dropoff)", df) == [dt.date(2026, 1, 5), dt.date(2026, 3, 1), dt.date(2026, 1, 1)]
    assert ev("date(day)", df) == [dt.date(2026, 1, 4), None, dt.date(2026, 12, 31)]
    assert ev('strftime(pickup, "%Y-%m")', df) == ["2026-01", "2026-02", None]
    assert ev('strftime(pickup, "%Y")', df) == ["2026", "2026", None]
    assert ev('strftime(pickup, "%Y-%m-%d")', df) == ["2026-01-05", "2026-02-28", None]
    assert ev('strftime(pickup, "%H:%M")', df) == ["10:00", "23:30", None]
    assert ev('strftime(day, "%Y-%m")', df) == ["2026-01", None, "2026-12"]


def test_strftime_format_must_be_a_literal(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError):
        compile_expr("strftime(pickup, name)")


def test_isnull_and_notnull_count_nan_as_null(df: pd.DataFrame) -> None:
    assert ev("isnull(tip)", df) == [True, False, True]
    assert ev("notnull(tip)", df) == [False, True, False]
    assert ev("isnull(nan)", df) == [True, False, True]
    assert ev("notnull(nan)", df) == [False, True, False]


def test_string_functions(df: pd.DataFrame) -> None:
    assert ev("lower(name)", df) == ["  jfk airport ", "la guardia", None]
    assert ev("upper(name)", df) == ["  JFK AIRPORT ", "LA GUARDIA", None]
    assert ev("strip(name)", df) == ["JFK Airport", "la guardia", None]
    assert ev("len(name)", df) == [14, 10, None]
    assert dtype("len(name)", df) == pa.int64()
    assert ev('contains(name, "Air")', df) == [True, False, None]
    assert ev('contains(name, "a.r")', df) == [False, False, None]  # a literal substring, not a pattern
    assert ev('startswith(strip(name), "JFK")', df) == [True, False, None]
    assert ev('endswith(name, "dia")', df) == [False, True, None]


def test_numeric_functions(df: pd.DataFrame) -> None:
    assert ev("abs(x)", df) == [2.5, 3.7, None]
    assert ev("abs(n)", df) == [7, 12, None]
    assert ev("floor(x)", df) == [-3.0, 3.0, None]
    assert ev("ceil(x)", df) == [-2.0, 4.0, None]
    assert ev("round(x)", df) == [-2.0, 4.0, None]  # half to even: -2.5 -> -2
    assert ev("round(x * 10 + 0.04, 0)", df) == [-25.0, 37.0, None]
    assert ev("round(x, 1)", df) == [-2.5, 3.7, None]


def test_round_digits_must_be_an_integer_literal(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError):
        compile_expr("round(x, 1.5)")


def test_where_picks_per_row_and_a_null_condition_picks_the_second(df: pd.DataFrame) -> None:
    assert ev("where(flag, 1, 2)", df) == [1, 2, 2]
    assert ev("where(x > 0, x, 0)", df) == [0.0, 3.7, 0.0]
    assert ev("where(tip > 0, tip, None)", df) == [None, 1.0, None]


def test_where_needs_a_boolean_condition(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError, match="true/false"):
        compile_expr("where(x, 1, 2)").evaluate(df)


def test_coalesce_takes_the_first_non_null(df: pd.DataFrame) -> None:
    assert ev("coalesce(tip, extra, 0)", df) == [0.5, 1.0, 0.0]
    assert ev("coalesce(tip, extra)", df) == [0.5, 1.0, None]
    assert ev("coalesce(None, tip)", df) == [None, 1.0, None]


def test_clip_limits_and_none_leaves_a_side_open(df: pd.DataFrame) -> None:
    assert ev("clip(n, 0, 10)", df) == [0, 10, None]
    assert ev("clip(n, 0, None)", df) == [0, 12, None]
    assert ev("clip(n, None, 10)", df) == [-7, 10, None]
    assert ev("clip(x, -1.0, 1.0)", df) == [-1.0, 1.0, None]


def test_conversions(df: pd.DataFrame) -> None:
    assert ev("int(x)", df) == [-2, 3, None]  # truncates toward zero
    assert dtype("int(x)", df) == pa.int64()
    assert ev("float(num_text)", df) == [12.0, 3.5, None]  # trimmed
    assert ev("float(n)", df) == [-7.0, 12.0, None]
    assert ev("str(n)", df) == ["-7", "12", None]
    assert dtype("str(x)", df) == pa.string()
    frame = pd.DataFrame({"t": pd.Series([" 12 ", "-3", None], dtype=A(pa.string()))})
    assert ev("int(t)", frame) == [12, -3, None]


def test_int_of_text_that_is_not_an_integer_is_an_error(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError):
        compile_expr("int(num_text)").evaluate(df)  # "3.5"


@pytest.mark.parametrize(
    "call",
    [
        "minutes()",
        "year(pickup, pickup)",
        "where(flag, 1)",
        "clip(x, 0)",
        "contains(name)",
        "round(x, 1, 2)",
        "coalesce()",
        "nosuch(x)",
    ],
)
def test_wrong_argument_counts_and_unknown_names_fail_at_compile_time(call: str) -> None:
    with pytest.raises(ExprError):
        compile_expr(call)


def test_functions_nest_and_work_in_filters(df: pd.DataFrame) -> None:
    mask = compile_expr('month(pickup) == 1 and contains(lower(strip(name)), "jfk")').mask(df)
    assert mask.tolist() == [True, False, False]


@pytest.mark.parametrize("span_days", [0, 400, _SPAN_DAYS - 1, _SPAN_DAYS, 3_000_000])
@pytest.mark.parametrize("fmt", ["%Y", "%Y-%m", "%Y-%m-%d"])
def test_date_prefixes_are_the_texts_of_each_value(span_days: int, fmt: str) -> None:
    """The ISO-prefix formats give, chunk by chunk, the texts Arrow writes for each value:
    dates spread over a short span (formatted once per day) or a long one (every value),
    nulls, an empty and an all-null chunk, years 1 and 9999."""
    first = dt.datetime(1, 1, 1) if span_days > 1_000_000 else dt.datetime(2024, 2, 27, 13, 5)
    values = [first + dt.timedelta(days=span_days * k // 6, hours=k) for k in range(7)]
    ts = pa.timestamp("us")
    column = pa.chunked_array(
        [pa.array([*values, None, dt.datetime(9999, 12, 31, 23)][: 9 if span_days > 1_000_000 else 8], ts)]
        + [pa.array([], ts), pa.array([None, None], ts), pa.array(values[::-1], ts).slice(2)]
    )
    got = FUNCTIONS["strftime"].impl(column, fmt)
    width = {"%Y": 4, "%Y-%m": 7, "%Y-%m-%d": 10}[fmt]
    want = pc.utf8_slice_codeunits(column.cast(pa.date32()).cast(pa.string()), 0, width)
    assert got.equals(want)
    assert [len(c) for c in got.chunks] == [len(c) for c in want.chunks]

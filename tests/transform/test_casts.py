"""Casting one column: the documented dtype whatever the values, bad values as null + mask, trimming."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.transform.casts import _differs_from_print, _Problem, _strptime_fixed, _strptime_strict, _trimmed, cast_column

ARROW = pd.ArrowDtype
DTYPES = {
    "string": ARROW(pa.string()),
    "int64": ARROW(pa.int64()),
    "Int64": pd.Int64Dtype(),
    "int32": ARROW(pa.int32()),
    "Int32": pd.Int32Dtype(),
    "float64": ARROW(pa.float64()),
    "float32": ARROW(pa.float32()),
    "bool": ARROW(pa.bool_()),
    "boolean": pd.BooleanDtype(),
    "category": ARROW(pa.dictionary(pa.int32(), pa.string())),
    "timestamp": ARROW(pa.timestamp("us")),
    "date": ARROW(pa.date32()),
}
GOOD = {
    "string": ["a", " b "],
    "int64": ["1", "-2"],
    "Int64": ["1", "-2"],
    "int32": ["1", "-2"],
    "Int32": ["1", "-2"],
    "float64": ["1.5", "-2"],
    "float32": ["1.5", "-2"],
    "bool": ["true", "0"],
    "boolean": ["yes", "n"],
    "category": ["x", "y"],
    "timestamp": ["2026-01-02 03:04:05", "2026-02-01"],
    "date": ["2026-01-02", "2026-03-04"],
}


def text(values: list[str | None]) -> pd.Series:
    return pd.Series(values, dtype=ARROW(pa.string()), name="col")


def values(s: pd.Series) -> list[object]:
    return [None if pd.isna(v) else v for v in s.tolist()]


@pytest.mark.parametrize("kind", list(DTYPES))
@pytest.mark.parametrize("case", ["good", "bad", "nulls", "blank", "empty"])
def test_each_cast_gives_its_documented_dtype_whatever_the_values(kind: str, case: str) -> None:
    data = {"good": GOOD[kind], "bad": ["not a value", "?"], "nulls": [None, None], "blank": ["", "   "], "empty": []}[
        case
    ]
    out, bad = cast_column(text(data), kind)
    assert out.dtype == DTYPES[kind]
    assert out.name == "col" and len(out) == len(data) and isinstance(bad, np.ndarray) and bad.dtype == bool
    if case in ("good", "nulls", "empty"):
        assert not bad.any()
    if case == "bad" and kind not in ("string", "category"):
        assert bad.all() and out.isna().all()


def test_index_is_kept() -> None:
    s = pd.Series(["1", "2", "3"], index=[10, 20, 30], dtype=ARROW(pa.string()))
    out, _ = cast_column(s, "int64")
    assert list(out.index) == [10, 20, 30]


def test_bad_values_become_null_and_are_flagged_only_where_present() -> None:
    out, bad = cast_column(text(["12", "x12", None, "", " 7 ", "12.5"]), "Int64")
    assert values(out) == [12, None, None, None, 7, None]
    assert bad.tolist() == [False, True, False, False, False, True]  # a null or blank is not a bad value


@pytest.mark.parametrize("kind", ["int64", "Int64", "int32", "Int32"])
def test_integer_text_forms(kind: str) -> None:
    out, bad = cast_column(text(["12", "+12", "007", "12.0", "1e3", "-0", " 5\t", "0x1F", "12.5", "1e20"]), kind)
    assert values(out) == [12, 12, 7, 12, 1000, 0, 5, None, None, None]
    assert bad.tolist() == [False] * 7 + [True] * 3


def test_long_integer_text_is_exact_or_bad() -> None:
    out, bad = cast_column(
        text(["9223372036854775807", "9223372036854775808", "-9223372036854775808", "0000000000000000000000001"]),
        "int64",
    )
    assert values(out) == [2**63 - 1, None, -(2**63), 1]
    assert bad.tolist() == [False, True, False, False]


def test_int32_out_of_range_is_a_bad_value() -> None:
    out, bad = cast_column(text(["2147483647", "2147483648", "-2147483648", "-2147483649"]), "int32")
    assert values(out) == [2**31 - 1, None, -(2**31), None]
    assert bad.tolist() == [False, True, False, True]


def test_float_text_forms() -> None:
    out, bad = cast_column(text([" 1.5 ", "-.5", "1e-3", "inf", "NaN", "1,5", "abc"]), "float64")
    got = values(out)
    assert got[:4] == [1.5, -0.5, 0.001, float("inf")] and got[5:] == [None, None]
    assert bad.tolist() == [False, False, False, False, False, True, True]


@pytest.mark.parametrize("kind", ["bool", "boolean"])
def test_bool_text_in_any_case(kind: str) -> None:
    out, bad = cast_column(
        text(["true", "T", "Yes", "y", "1", "FALSE", "f", "no", "N", "0", " yes ", "maybe", ""]), kind
    )
    assert values(out) == [True] * 5 + [False] * 5 + [True, None, None]
    assert bad.tolist() == [False] * 11 + [True, False]


def test_string_and_category_keep_text_as_it_is() -> None:
    s = text([" a ", "", None, "b"])
    out, bad = cast_column(s, "string")
    assert values(out) == [" a ", "", None, "b"] and not bad.any()
    cat, bad = cast_column(s, "category")
    assert values(cat) == [" a ", "", None, "b"] and not bad.any()


def test_category_of_typed_values_keeps_their_type() -> None:
    out, _ = cast_column(pd.Series([1, 2, 1], dtype=ARROW(pa.int64())), "category")
    assert out.dtype == ARROW(pa.dictionary(pa.int32(), pa.int64()))


def test_timestamp_text_with_an_offset_is_converted_to_utc_and_made_naive() -> None:
    out, bad = cast_column(
        text(["2026-01-02T03:04:05+02:00", "2026-01-02 03:04:05", "2026-13-01", " 2026-01-02 "]), "timestamp"
    )
    assert values(out) == [
        pd.Timestamp("2026-01-02 01:04:05"),
        pd.Timestamp("2026-01-02 03:04:05"),
        None,
        pd.Timestamp("2026-01-02"),
    ]
    assert bad.tolist() == [False, False, True, False]


def test_timestamp_with_a_format() -> None:
    out, bad = cast_column(
        text(["02/01/2026 10:00", "2026-01-02 10:00", " 03/01/2026 11:30 "]), "timestamp", "%d/%m/%Y %H:%M"
    )
    assert values(out) == [pd.Timestamp("2026-01-02 10:00"), None, pd.Timestamp("2026-01-03 11:30")]
    assert bad.tolist() == [False, True, False]


def test_impossible_calendar_date_without_a_format_is_a_bad_value() -> None:
    out, bad = cast_column(text(["2026-02-30 00:00:00", "2026-04-31 00:00:00"]), "timestamp")
    assert values(out) == [None, None] and bad.all()


def test_impossible_calendar_date_with_a_format_is_a_bad_value() -> None:
    out, bad = cast_column(text(["2026-02-30 00:00:00", "2026-04-31 00:00:00"]), "timestamp", "%Y-%m-%d %H:%M:%S")
    assert values(out) == [None, None] and bad.all()


def test_a_format_still_reads_unpadded_fields_and_offsets_beside_impossible_dates() -> None:
    raw = ["2026-1-2 3:04:05", "2026-02-29 00:00:00", "2024-02-29 00:00:00", None, "2026-01-02 03:04:05"]
    out, bad = cast_column(text(raw), "timestamp", "%Y-%m-%d %H:%M:%S")
    assert values(out) == [
        pd.Timestamp("2026-01-02 03:04:05"),
        None,
        pd.Timestamp("2024-02-29"),
        None,
        pd.Timestamp("2026-01-02 03:04:05"),
    ]
    assert bad.tolist() == [False, True, False, False, False]
    out, bad = cast_column(
        text(["2026-02-28 00:00:00+0100", "2026-02-30 00:00:00+0100"]), "timestamp", "%Y-%m-%d %H:%M:%S%z"
    )
    assert values(out) == [pd.Timestamp("2026-02-27 23:00:00"), None] and bad.tolist() == [False, True]


def test_utc_gives_an_aware_timestamp_taking_naive_text_as_utc() -> None:
    out, bad = cast_column(text(["2026-01-02 03:00:00", "2026-01-02T03:00:00-01:00"]), "timestamp", utc=True)
    assert out.dtype == ARROW(pa.timestamp("us", "UTC")) and not bad.any()
    assert values(out) == [pd.Timestamp("2026-01-02 03:00", tz="UTC"), pd.Timestamp("2026-01-02 04:00", tz="UTC")]


def test_date_is_the_date_of_the_parsed_timestamp() -> None:
    out, bad = cast_column(text(["2026-01-02 23:59:59", "2026-02-30"]), "date")
    assert values(out) == [dt.date(2026, 1, 2), None] and bad.tolist() == [False, True]


def test_timestamp_and_date_columns_cast_without_text() -> None:
    ts = pd.Series(pd.to_datetime(["2026-01-02 03:04:05"]).astype("datetime64[ns]"))
    out, bad = cast_column(ts, "date")
    assert out.dtype == DTYPES["date"] and values(out) == [dt.date(2026, 1, 2)] and not bad.any()
    dates = pd.Series([dt.date(2026, 1, 2)], dtype=ARROW(pa.date32()))
    out, _ = cast_column(dates, "timestamp")
    assert values(out) == [pd.Timestamp("2026-01-02")]


def test_numbers_that_do_not_fit_an_integer_are_bad_values() -> None:
    out, bad = cast_column(pd.Series([1.0, 1.5, None, 2.0**70]), "int64")
    assert values(out) == [1, None, None, None]
    assert bad.tolist() == [False, True, False, True]


def test_number_columns_cast_between_types() -> None:
    out, bad = cast_column(pd.Series([1, 2, 3], dtype="int64"), "float32")
    assert out.dtype == DTYPES["float32"] and values(out) == [1.0, 2.0, 3.0] and not bad.any()
    out, _ = cast_column(pd.Series([0, 1, None], dtype="Int64"), "boolean")
    assert out.dtype == pd.BooleanDtype() and values(out) == [False, True, None]


def test_a_column_of_an_impossible_type_is_a_problem_not_bad_values() -> None:
    lists = pd.Series([[1], [2]], dtype=ARROW(pa.list_(pa.int64())))
    with pytest.raises(_Problem, match="cannot be cast"):
        cast_column(lists, "int64")
    with pytest.raises(_Problem, match="must hold text"):
        cast_column(pd.Series([1, 2]), "timestamp")


FORMATS = ("%Y-%m-%d %H:%M:%S", "%d/%m/%Y %H:%M", "%Y%m%d", "%Y-%m-%d %H:%M:%S%%")
_field = st.integers(0, 99).map(lambda n: f"{n:02d}")
_stamp = st.one_of(
    st.none(),
    st.just(""),
    st.builds(
        lambda y, m, d, h, mi, s, sep: f"{y}-{m}-{d}{sep}{h}:{mi}:{s}",
        st.sampled_from(["2024", "1999", "202"]),
        _field,
        _field,
        _field,
        _field,
        _field,
        st.sampled_from([" ", "  ", "\t", "T"]),
    ),
    st.builds(
        lambda d, m, y, h, mi: f"{d}/{m}/{y} {h}:{mi}", _field, _field, st.sampled_from(["2024", "24"]), _field, _field
    ),
    st.builds(lambda y, m, d: f"{y}{m}{d}", st.sampled_from(["2024", "2023"]), _field, _field),
    st.text(alphabet="0123456789-/: ٢", max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_stamp, max_size=12), fmt=st.sampled_from(FORMATS), start=st.integers(0, 3))
def test_the_print_check_finds_what_strftime_finds(values: list[str | None], fmt: str, start: int) -> None:
    """The fixed-width print check (numpy on the text's bytes) flags exactly the values that
    Arrow's strftime would not print back as the same text (impossible dates, unpadded
    fields, other whitespace), on sliced arrays too."""
    text_arr = pa.array(values, pa.string()).slice(min(start, len(values)))
    parsed = pc.strptime(text_arr, format=fmt, unit="us", error_is_null=True)
    printed = pc.strftime(parsed.cast(pa.timestamp("s"), safe=False), format=fmt)
    want = pc.fill_null(pc.not_equal(printed, text_arr), False)
    assert _differs_from_print(text_arr, parsed, fmt).to_pylist() == want.to_pylist()


_year = st.sampled_from(["2024", "2023", "2000", "1900", "0001", "9999", "0000", "1970", "1969"])
_day_field = st.integers(0, 32).map(lambda n: f"{n:02d}")
_time_field = st.integers(0, 61).map(lambda n: f"{n:02d}")
_calendar = st.one_of(
    _stamp,
    st.builds(
        lambda y, m, d, h, mi, s: f"{y}-{m}-{d} {h}:{mi}:{s}",
        _year,
        st.integers(0, 13).map(lambda n: f"{n:02d}"),
        _day_field,
        st.integers(0, 25).map(lambda n: f"{n:02d}"),
        _time_field,
        _time_field,
    ),
    st.builds(lambda d, m, y: f"{d}/{m}/{y} 23:59", _day_field, st.sampled_from(["01", "02", "04", "12"]), _year),
    st.builds(lambda y, d: f"{y}02{d}", _year, st.sampled_from(["28", "29", "30"])),
)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(_calendar, max_size=12),
    fmt=st.sampled_from(FORMATS + ("%Y-%m-%d", "%d.%m.%Y")),
    start=st.integers(0, 3),
    large=st.booleans(),
)
def test_the_fixed_width_parse_gives_what_strptime_and_the_print_check_give(
    values: list[str | None], fmt: str, start: int, large: bool
) -> None:
    """The numpy read of fixed-width text gives the same times, and the same nulls, as
    Arrow's strptime with the print-back check and pandas (leap days, impossible dates,
    second 60, hour 24, year 0, unpadded fields, other widths), on sliced arrays too."""
    text_arr = pa.array(values, pa.large_string() if large else pa.string()).slice(min(start, len(values)))
    fast = _strptime_fixed(text_arr, fmt)
    if "%%" in fmt:
        assert fast is None  # not a format of fields and literals only: the strptime path
        return
    assert fast is not None
    slow = _strptime_strict(text_arr, fmt)
    assert fast.type == slow.type
    assert fast.cast(pa.int64()).to_pylist() == slow.cast(pa.int64()).to_pylist()  # year 0 has no Python datetime


def test_the_fixed_width_parse_reads_only_formats_of_fields_with_a_date() -> None:
    text_arr = pa.array(["12:30"])
    assert _strptime_fixed(text_arr, "%H:%M") is None  # no date: strptime's defaults apply
    assert _strptime_fixed(text_arr, "%Y-%m-%d %Y") is None  # a field twice
    assert _strptime_fixed(pa.array(["2024-01-02"]), "%Y-%m-%d") is not None


def test_whitespace_blanks_and_impossible_dates_beside_plain_text_are_still_found() -> None:
    """Plain values take the fast paths; a value with whitespace around it, a blank, a
    non-ASCII space or an impossible date beside them is trimmed, nulled or flagged as before."""
    values = ["2024-02-29 10:00:00", " 2024-03-01 10:00:00", "2024-03-02 10:00:00\t", "", None]
    values += ["\u00a02024-03-03 10:00:00", "2023-02-29 10:00:00", "2024-03-04 10:00:00"]
    out, bad = cast_column(text(values), "timestamp", "%Y-%m-%d %H:%M:%S")
    day = dt.datetime(2024, 3, 1, 10)
    assert out.tolist()[:3] == [pd.Timestamp(dt.datetime(2024, 2, 29, 10)), pd.Timestamp(day)] + [
        pd.Timestamp(day + dt.timedelta(days=1))
    ]
    assert pd.isna(out.iloc[3]) and pd.isna(out.iloc[4]) and pd.isna(out.iloc[6])
    assert out.iloc[5] == pd.Timestamp(day + dt.timedelta(days=2))
    assert out.iloc[7] == pd.Timestamp(day + dt.timedelta(days=3))
    assert bad.tolist() == [False, False, False, False, False, False, True, False]


@pytest.mark.parametrize(
    ("values", "plain"),
    [
        (["a", "b c", None], True),
        ([" a", "b"], False),
        (["a", "b\n"], False),
        (["a", ""], False),  # a blank becomes null
        (["a", "\u00a0b"], False),  # a non-ASCII byte at either end may be a Unicode space
        (["a", "b\u00e9"], False),
        ([None, None], True),
        ([], True),
    ],
)
def test_trimmed_says_when_the_trim_would_change_nothing(values: list[str | None], plain: bool) -> None:
    arr = pa.array(values, pa.string())
    assert _trimmed(arr) is plain
    if plain:
        assert pc.utf8_trim_whitespace(arr).equals(arr)
    assert _trimmed(pa.array(["x", *values], pa.string()).slice(1)) is plain


def test_every_ascii_byte_the_trim_removes_is_one_the_check_looks_for() -> None:
    """``_trimmed`` takes bytes up to space and from DEL up as possible whitespace; Arrow's
    trim removes no other ASCII character."""
    for code in range(0x21, 0x7F):
        value = f"{chr(code)}a{chr(code)}"
        assert pc.utf8_trim_whitespace(pa.array([value])).to_pylist() == [value]
        assert _trimmed(pa.array([value]))


_cell = st.one_of(
    st.none(),
    st.sampled_from(["", " ", "12", " 7\t", "1.5", "x", "true", "no", "2024-02-29 10:00:00", "2023-02-29 10:00:00"]),
    st.text(alphabet="0123456789.-: tx", max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_cell, max_size=10), kind=st.sampled_from(sorted(DTYPES)))
def test_a_value_is_bad_exactly_where_it_was_present_and_came_out_null(values: list[str | None], kind: str) -> None:
    """The bad-value mask (skipped when the output has no more nulls than the input) is
    what it means: present in the input (not null, not blank once trimmed) and null out."""
    out, bad = cast_column(text(values), kind)
    keeps_blanks = kind in ("string", "category")
    present = [v is not None and (keeps_blanks or v.strip() != "") for v in values]
    assert bad.tolist() == [p and bool(pd.isna(o)) for p, o in zip(present, out.tolist())]


def test_year_zero_is_a_bad_value_beside_the_first_day() -> None:
    """Year 0 parses (Arrow has it; Python has not): it is made null and flagged, whether
    or not the column also holds 0001-01-01, the first day kept."""
    out, bad = cast_column(text(["0000-01-01 00:00:00", "0001-01-01 00:00:00", None]), "timestamp", "%Y-%m-%d %H:%M:%S")
    assert pd.isna(out.iloc[0]) and out.iloc[1] == pd.Timestamp(dt.datetime(1, 1, 1)) and pd.isna(out.iloc[2])
    assert bad.tolist() == [True, False, False]
    out, bad = cast_column(text(["0001-01-01 00:00:00"]), "timestamp", "%Y-%m-%d %H:%M:%S")
    assert out.iloc[0] == pd.Timestamp(dt.datetime(1, 1, 1)) and not bad.any()

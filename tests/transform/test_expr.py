"""The expression language: every operator and function, null handling, errors.

Expected values are computed with plain pandas/Python on the same data, not hard-coded,
except where the rule itself is the point (three-valued logic, error messages).
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from etl.transform.expr import FUNCTIONS, ExprError, check_expr, compile_expr

ROWS = range(100, 106)  # a chunk's index holds source row numbers


def arrow(values: list, type_: pa.DataType) -> pd.arrays.ArrowExtensionArray:
    return pd.arrays.ArrowExtensionArray(pa.array(values, type_))


@pytest.fixture
def df() -> pd.DataFrame:
    """The column types a chunk can hold after casts or from Parquet, with nulls."""
    return pd.DataFrame(
        {
            "a": arrow([1, 2, None, -7, 0, 9], pa.int64()),
            "b": pd.array([0, 2, 3, 2, 0, None], dtype="Int64"),
            "x": arrow([1.5, -2.25, None, 0.0, 3.5, 10.0], pa.float64()),
            "f": [0.5, np.nan, 2.0, -1.5, 4.0, 1.0],  # numpy float64: NaN is null
            "s": pd.array([" Card ", "cash", None, "x", "CASH", "card"], dtype="string[pyarrow]"),
            "p": pd.array(["JFK-1", "LGA", None, "JFK", "ewr", "x"], dtype="str"),  # NaN-style strings
            "t0": arrow(
                [
                    pd.Timestamp("2026-01-01 10:00"),
                    pd.Timestamp("2026-01-31 23:59:30"),
                    None,
                    pd.Timestamp("2025-12-31 23:00"),
                    pd.Timestamp("2026-02-28 06:15"),
                    pd.Timestamp("2026-03-01"),
                ],
                pa.timestamp("ns"),
            ),
            "t1": arrow(
                [
                    pd.Timestamp("2026-01-01 10:30"),
                    pd.Timestamp("2026-02-01 01:00"),
                    pd.Timestamp("2026-01-01"),
                    None,
                    pd.Timestamp("2026-02-28 06:15"),
                    pd.Timestamp("2026-03-02 12:00"),
                ],
                pa.timestamp("ns"),
            ),
            "trip distance": [1.0, 2.0, 3.0, None, 5.0, 6.0],
        },
        index=ROWS,
    )


def vals(obj: pd.Series | pd.Index | np.ndarray | list) -> list:
    """Values as plain Python, every kind of null as None."""
    return [
        None if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)) else v
        for v in list(obj)
    ]


def ev(text: str, frame: pd.DataFrame) -> pd.Series:
    result = compile_expr(text).evaluate(frame)
    assert isinstance(result, pd.Series)
    assert list(result.index) == list(frame.index)
    return result


def py(frame: pd.DataFrame, col: str) -> list:
    return vals(frame[col])


# ------------------------------------------------------------------------ basics


def test_bare_names_and_backticks_reference_columns(df: pd.DataFrame) -> None:
    e = compile_expr("`trip distance` * 2 + a")
    assert e.columns == {"trip distance", "a"}
    expected = [None if d is None or a is None else d * 2 + a for d, a in zip(py(df, "trip distance"), py(df, "a"))]
    assert vals(e.evaluate(df)) == expected


def test_backticks_inside_string_literals_are_left_alone(df: pd.DataFrame) -> None:
    e = compile_expr("p == '`x`' or `s` == \"a`b\"")
    assert e.columns == {"p", "s"}


def test_a_column_named_like_a_keyword_needs_backticks() -> None:
    frame = pd.DataFrame({"class": [1, 2]})
    assert vals(ev("`class` + 1", frame)) == [2, 3]


def test_literals_and_constant_expressions_give_python_values(df: pd.DataFrame) -> None:
    assert compile_expr("1 + 2 * 3").evaluate(df) == 7
    assert compile_expr("'a' + 'b'").evaluate(df) == "ab"
    assert compile_expr("True and not False").evaluate(df) is True
    assert compile_expr("None").evaluate(df) is None
    assert compile_expr("-2.5").evaluate(df) == -2.5


def test_results_are_arrow_backed_and_keep_the_index(df: pd.DataFrame) -> None:
    result = ev("f + 1", df)
    assert isinstance(result.dtype, pd.ArrowDtype)
    assert result.dtype.pyarrow_dtype == pa.float64()
    assert vals(result) == vals(df["f"] + 1)  # NaN in a numpy column counts as null


# -------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_arithmetic_matches_python_per_row(df: pd.DataFrame, op: str) -> None:
    got = vals(ev(f"a {op} b", df))
    fn = {"+": lambda p, q: p + q, "-": lambda p, q: p - q, "*": lambda p, q: p * q}[op]
    assert got == [None if p is None or q is None else fn(p, q) for p, q in zip(py(df, "a"), py(df, "b"))]


def test_true_division_gives_float_with_inf_and_nan_for_zero(df: pd.DataFrame) -> None:
    got = ev("a / b", df)
    assert got.dtype.pyarrow_dtype == pa.float64()
    expected = (df["a"].astype("float64[pyarrow]") / df["b"].astype("float64[pyarrow]")).tolist()
    assert got.iloc[0] == math.inf  # 1 / 0, like pandas
    assert math.isnan(got.iloc[4])  # 0 / 0
    assert vals(got)[1:4] == vals(expected)[1:4]


def test_floor_division_and_modulo_follow_python_and_null_on_zero(df: pd.DataFrame) -> None:
    a, b = py(df, "a"), py(df, "b")
    fd = vals(ev("a // b", df))
    md = vals(ev("a % b", df))
    for i, (p, q) in enumerate(zip(a, b)):
        if p is None or q is None or q == 0:
            assert fd[i] is None and md[i] is None
        else:
            assert (fd[i], md[i]) == (p // q, p % q)
    assert compile_expr("-7 // 2").evaluate(df) == -4


def test_float_floor_division_and_modulo_match_pandas(df: pd.DataFrame) -> None:
    expected_fd = df["x"].astype("float64") // 2
    expected_md = df["x"].astype("float64") % -2
    assert vals(ev("x // 2", df)) == vals(expected_fd)
    assert vals(ev("x % -2", df)) == vals(expected_md)
    assert math.isnan(ev("x % 0", df).iloc[0])


def test_power_and_unary_minus(df: pd.DataFrame) -> None:
    assert vals(ev("a ** 2", df)) == [None if v is None else v**2 for v in py(df, "a")]
    assert vals(ev("2 ** -a", df))[0] == 0.5  # negative integer exponent: float result
    assert vals(ev("-x", df)) == [None if v is None else -v for v in py(df, "x")]


def test_plus_joins_strings(df: pd.DataFrame) -> None:
    expected = [None if v is None or w is None else v + "/" + w for v, w in zip(py(df, "s"), py(df, "p"))]
    assert vals(ev("s + '/' + p", df)) == expected


# -------------------------------------------------------------------- comparisons


def test_comparisons_match_pandas(df: pd.DataFrame) -> None:
    for op in ["==", "!=", "<", "<=", ">", ">="]:
        expected = eval(f"df['a'] {op} df['b']")  # pandas' own operator as the oracle
        assert vals(ev(f"a {op} b", df)) == vals(expected), op


def test_chained_comparison_is_a_conjunction(df: pd.DataFrame) -> None:
    expected = (df["x"] > 0) & (df["x"] <= 5)
    assert vals(ev("0 < x <= 5", df)) == vals(expected)


def test_in_and_not_in_with_literal_lists(df: pd.DataFrame) -> None:
    lowered = [None if v is None else v.strip().lower() for v in py(df, "s")]
    assert vals(ev("lower(strip(s)) in ('card', 'cash')", df)) == [
        None if v is None else v in ("card", "cash") for v in lowered
    ]
    assert vals(ev("a not in [1, -7]", df)) == [None if v is None else v not in (1, -7) for v in py(df, "a")]
    assert vals(ev("x in (1.5, 10)", df)) == [None if v is None else v in (1.5, 10.0) for v in py(df, "x")]


def test_timestamp_compared_with_a_string_literal(df: pd.DataFrame) -> None:
    expected = df["t0"] >= pd.Timestamp("2026-01-15")
    assert vals(ev("t0 >= '2026-01-15'", df)) == vals(expected)


def test_and_or_not_use_three_valued_logic() -> None:
    frame = pd.DataFrame(
        {
            "p": arrow([True, True, True, False, False, False, None, None, None], pa.bool_()),
            "q": arrow([True, False, None] * 3, pa.bool_()),
        }
    )
    p, q = py(frame, "p"), py(frame, "q")

    def kleene_and(u, v):
        return False if u is False or v is False else (None if u is None or v is None else True)

    def kleene_or(u, v):
        return True if u is True or v is True else (None if u is None or v is None else False)

    assert vals(ev("p and q", frame)) == [kleene_and(u, v) for u, v in zip(p, q)]
    assert vals(ev("p or q", frame)) == [kleene_or(u, v) for u, v in zip(p, q)]
    assert vals(ev("not p", frame)) == [None if u is None else not u for u in p]


def test_filter_mask_counts_null_as_false(df: pd.DataFrame) -> None:
    mask = compile_expr("a > 0 and x > 0").mask(df)
    assert mask.dtype == bool
    expected = ((df["a"] > 0) & (df["x"] > 0)).fillna(False).astype(bool).to_numpy()
    assert mask.tolist() == expected.tolist()
    assert compile_expr("isnull(a) or a > 5").mask(df).tolist() == [False, False, True, False, False, True]
    assert compile_expr("True").mask(df).tolist() == [True] * len(df)
    assert compile_expr("None").mask(df).tolist() == [False] * len(df)


def test_filter_mask_rejects_non_boolean_results(df: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="must give true/false.*double"):
        compile_expr("x * 2").mask(df)


# ----------------------------------------------------------------------- functions


@pytest.mark.parametrize(("name", "seconds"), [("seconds", 1), ("minutes", 60), ("hours", 3600), ("days", 86400)])
def test_duration_functions(df: pd.DataFrame, name: str, seconds: int) -> None:
    expected = (df["t1"].astype("datetime64[ns]") - df["t0"].astype("datetime64[ns]")).dt.total_seconds() / seconds
    got = ev(f"{name}(t1 - t0)", df)
    assert got.dtype.pyarrow_dtype == pa.float64()
    got_values, expected_values = vals(got), vals(expected)
    assert [v is None for v in got_values] == [v is None for v in expected_values]
    assert [v for v in got_values if v is not None] == pytest.approx([v for v in expected_values if v is not None])


def test_strftime_gives_a_month_key(df: pd.DataFrame) -> None:
    expected = df["t0"].astype("datetime64[ns]").dt.strftime("%Y-%m")
    assert vals(ev("strftime(t0, '%Y-%m')", df)) == vals(expected)


@pytest.mark.parametrize("name", ["year", "month", "day", "hour", "weekday", "date"])
def test_calendar_fields_match_pandas(df: pd.DataFrame, name: str) -> None:
    ts = df["t0"].astype("datetime64[ns]")
    expected = ts.dt.date if name == "date" else getattr(ts.dt, "day_of_week" if name == "weekday" else name)
    got = ev(f"{name}(t0)", df)
    assert vals(got) == vals(expected)
    if name != "date":
        assert got.dtype.pyarrow_dtype == pa.int64()


def test_isnull_and_notnull_treat_nan_as_null(df: pd.DataFrame) -> None:
    for col in ["a", "f", "s", "p", "t0"]:
        assert vals(ev(f"isnull({col})", df)) == df[col].isna().tolist(), col
        assert vals(ev(f"notnull({col})", df)) == df[col].notna().tolist(), col
    assert compile_expr("isnull(0.0 / 0)").evaluate(df) is True


@pytest.mark.parametrize(
    ("text", "method"),
    [
        ("lower(s)", lambda s: s.str.lower()),
        ("upper(p)", lambda s: s.str.upper()),
        ("strip(s)", lambda s: s.str.strip()),
        ("len(s)", lambda s: s.str.len()),
        ("contains(p, 'JF')", lambda s: s.str.contains("JF", regex=False)),
        ("startswith(p, 'JFK')", lambda s: s.str.startswith("JFK")),
        ("endswith(p, 'x')", lambda s: s.str.endswith("x")),
    ],
)
def test_string_functions_match_pandas(df: pd.DataFrame, text: str, method) -> None:
    col = text[text.index("(") + 1]
    nullable = df[col].astype("string[pyarrow]")  # pandas' NA-keeping strings: null in, null out
    assert vals(ev(text, df)) == vals(method(nullable))


def test_numeric_functions_match_numpy(df: pd.DataFrame) -> None:
    x = df["x"].astype("float64")
    assert vals(ev("abs(a)", df)) == [None if v is None else abs(v) for v in py(df, "a")]
    assert vals(ev("floor(x)", df)) == vals(np.floor(x))
    assert vals(ev("ceil(x)", df)) == vals(np.ceil(x))
    assert vals(ev("round(x, 1)", df)) == vals(x.round(1))
    assert vals(ev("round(x)", df)) == vals(x.round(0))  # half to even, like numpy
    assert vals(ev("clip(x, 0, 5)", df)) == vals(x.clip(0, 5))
    assert vals(ev("clip(x, None, 1)", df)) == vals(x.clip(upper=1))


def test_where_picks_per_row_and_null_condition_takes_the_else_branch(df: pd.DataFrame) -> None:
    cond = (df["x"] > 0).fillna(False).astype(bool)
    expected = [xv if c else 0.0 for c, xv in zip(cond, py(df, "x"))]
    assert vals(ev("where(x > 0, x, 0)", df)) == expected


def test_coalesce_takes_the_first_non_null(df: pd.DataFrame) -> None:
    expected = df["a"].astype("Int64").combine_first(df["b"]).fillna(-1)
    assert vals(ev("coalesce(a, b, -1)", df)) == vals(expected)


def test_conversions(df: pd.DataFrame) -> None:
    assert vals(ev("int(x)", df)) == [None if v is None else int(v) for v in py(df, "x")]
    assert vals(ev("float(a)", df)) == [None if v is None else float(v) for v in py(df, "a")]
    assert vals(ev("str(a)", df)) == [None if v is None else str(v) for v in py(df, "a")]
    frame = pd.DataFrame({"t": [" 12 ", "3", None]})
    assert vals(ev("int(t) + 1", frame)) == [13, 4, None]
    assert vals(ev("float(t) / 2", frame)) == [6.0, 1.5, None]


def test_every_function_is_documented_with_an_example() -> None:
    import etl.transform.expr as module

    doc = module.__doc__ or ""
    for name in FUNCTIONS:
        assert f"{name}(" in doc, name


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo(x) > 1", r"unknown function 'foo' at column 1 in 'foo\(x\) > 1'; known: abs, ceil"),
        ("a +* b", r"syntax error at column 4 in 'a \+\* b'"),
        ("`trip distance` > )", r"syntax error at column 19"),
        ("x.real > 1", r"attribute access \('x.real'\) is not allowed at column 1"),
        ("a[0]", r"indexing .* is not allowed"),
        ("a if b else c", r"use where\(cond, a, b\)"),
        ("lambda: 1", r"lambda .* is not allowed"),
        ("round(x, a)", r"expected a literal .* got 'a' at column 10"),
        ("strftime(t0, 5)", r"argument 2 of strftime\(\) must be a str literal"),
        ("abs(x, 1)", r"abs\(\) takes 1 argument\(s\), got 2"),
        ("where(a, b)", r"where\(\) takes 3 argument\(s\), got 2"),
        ("`unclosed + 1", r"unterminated backtick at column 1"),
        ("a in b", r"right side of 'in' must be a literal list"),
        ("len(s=1)", r"positional arguments only"),
        ("a is None", r"comparison 'a is None' is not allowed.*; use isnull\(a\)"),
        ("a is not None", r"comparison 'a is not None' is not allowed.*; use notnull\(a\)"),
        ("a is b", r"comparison 'a is b' is not allowed \(use == or !=\)"),
        ("__import__('os')", r"unknown function '__import__'"),
    ],
)
def test_compile_errors_name_the_rule_and_position(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        check_expr(text)


def test_unknown_column_names_the_expression_and_lists_the_columns(df: pd.DataFrame) -> None:
    e = compile_expr("fare > 1")
    with pytest.raises(ValueError) as info:
        e.evaluate(df)
    message = str(info.value)
    assert "unknown column 'fare'" in message and "'fare > 1'" in message
    assert "available columns: a, b, x, f, s, p, t0, t1, trip distance" in message


def test_type_errors_name_the_sub_expression(df: pd.DataFrame) -> None:
    with pytest.raises(ExprError, match=r"cannot evaluate 'p > 1' in 'a > 0 and p > 1': not defined for types"):
        compile_expr("a > 0 and p > 1").evaluate(df)
    with pytest.raises(ExprError, match=r"minutes\(\) needs a time difference"):
        compile_expr("minutes(a)").evaluate(df)
    with pytest.raises(ExprError, match="'and' needs true/false values, got int64"):
        compile_expr("a and b").evaluate(df)


def test_compiled_expressions_are_cached_and_pickle(df: pd.DataFrame) -> None:
    assert compile_expr("a + 1") is compile_expr("a + 1")
    again = pickle.loads(pickle.dumps(compile_expr("a + 1")))
    assert vals(again.evaluate(df)) == vals(compile_expr("a + 1").evaluate(df))


def test_expressions_may_span_lines(df: pd.DataFrame) -> None:
    assert vals(ev("a > 0\n  and x > 0", df)) == vals(ev("a > 0 and x > 0", df))


def test_works_on_an_empty_frame(df: pd.DataFrame) -> None:
    empty = df.iloc[:0]
    assert len(ev("strftime(t0, '%Y') + lower(s)", empty)) == 0
    assert compile_expr("a > 1").mask(empty).tolist() == []


# ------------------------------------------------------------------ size limits (issue 18)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fare > 100000000000000000000000000000", r"integer literal 1000.* does not fit a 64-bit integer"),
        ("x in (1, 99999999999999999999)", r"integer literal 9999.* does not fit a 64-bit integer"),
        ("x == -" + "9" * 400, r"integer literal a 400-digit number .* does not fit"),
        (" + ".join(["x"] * 400), r"nests operators more than 100 levels deep"),
        ("-" * 3000 + "x", r"nests too deeply to parse"),
        ("-" * 101 + "x", r"nests operators more than 100 levels deep"),
        ("x" + " " * 20_000, r"at most 10000 are allowed"),
    ],
)
def test_oversized_expressions_are_refused_at_compile_time(text: str, expected: str) -> None:
    with pytest.raises(ExprError, match=expected):
        check_expr(text)


def test_expressions_at_the_limits_still_evaluate(df: pd.DataFrame) -> None:
    assert compile_expr("9223372036854775807 > 0").evaluate(df) is True
    assert compile_expr("-" * 98 + "a").evaluate(df).tolist() == df["a"].tolist()
    assert compile_expr("+".join(["1"] * 100)).evaluate(df) == 100


@pytest.mark.parametrize(
    "expr",
    ["fare > 100000000000000000000000000000", " + ".join(["fare"] * 400), "-" * 3000 + "fare"],
)
def test_validate_exits_2_naming_the_key_without_a_traceback(tmp_path: Path, expr: str) -> None:
    job = tmp_path / "job.toml"
    (tmp_path / "a.csv").write_text("fare\n1\n")
    job.write_text(
        f'[job]\nname = "x"\nstate_dir = "state"\n[sources]\nurls = ["a.csv"]\n'
        f'[transform]\nsteps = [{{op = "filter", expr = "{expr}"}}]\n'
        f'[output]\npath = "out"\n'
    )
    run_py = str(Path(__file__).resolve().parents[2] / "run.py")
    proc = subprocess.run(
        [sys.executable, run_py, "validate", "--config", str(job)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "transform.steps[0].expr" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("dep_delay != None", "notnull(dep_delay)"),
        ("dep_delay == None", "isnull(dep_delay)"),
        ("None != `dep delay`", "notnull(`dep delay`)"),
        ("x > 0 and s == None", "isnull(s)"),
        ("0 < a != None", "notnull(a)"),
    ],
)
def test_comparing_with_none_is_refused_with_the_function_to_use(text: str, hint: str) -> None:
    """``x != None`` is null on every row, so a filter would keep nothing, silently."""
    with pytest.raises(ExprError, match="is null on every row") as info:
        check_expr(text)
    assert str(info.value).endswith(f"use {hint}")


def test_none_as_a_value_is_still_allowed(df: pd.DataFrame) -> None:
    assert vals(ev("coalesce(a, None)", df)) == [1, 2, None, -7, 0, 9]
    assert vals(ev("clip(x, 0, None)", df)) == [1.5, 0.0, None, 0.0, 3.5, 10.0]


def test_validate_refuses_a_none_comparison_with_exit_2_and_the_hint(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[job]\nname = "j"\n[sources]\nurls = []\n'
        '[transform]\nsteps = [{op = "filter", expr = "dep_delay != None"}]\n'
        '[output]\npath = "out"\n'
    )
    run_py = str(Path(__file__).resolve().parents[2] / "run.py")
    proc = subprocess.run(
        [sys.executable, run_py, "validate", "--config", str(job)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "transform.steps[0].expr" in proc.stderr and "use notnull(dep_delay)" in proc.stderr
    assert "Traceback" not in proc.stderr

"""Transform steps on real chunks: every step kind, casts of messy text, bad-value policy,
lookups from real files (loaded once per process), python steps from a module on disk,
start-up validation, and chunking not changing the result (hypothesis)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from etl.core.chunks import parse_csv_chunk
from etl.core.config import ReadConfig, Step
from etl.core.errors import ConfigError, StepError
from etl.core.records import Chunk
from etl.transform.steps import (
    apply_steps,
    cast_column,
    read_lookup_table,
    typed_columns,
    validate_steps,
)

START = 1000  # the chunk's first source row number
_STEPS = TypeAdapter(list[Step])


def steps(*raw: dict[str, Any]) -> list[Any]:
    return _STEPS.validate_python(list(raw))


def text_chunk(columns: dict[str, list[str | None]], start: int = START) -> pd.DataFrame:
    """A chunk as the CSV reader hands it over: string columns, nulls for empty fields."""
    n = len(next(iter(columns.values())))
    return pd.DataFrame(
        {k: pd.array(v, dtype="string[pyarrow]") for k, v in columns.items()},
        index=pd.RangeIndex(start, start + n),
    )


def run(df: pd.DataFrame, *raw: dict[str, Any], base_dir: Path = Path("."), on_error: str = "fail"):
    return apply_steps(df, steps(*raw), base_dir=base_dir, on_error=on_error, label="trips.csv[chunk 0]")


def vals(series: pd.Series) -> list:
    return [
        None if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)) else v
        for v in series.tolist()
    ]


@pytest.fixture
def trips() -> pd.DataFrame:
    return text_chunk(
        {
            "pickup": [
                "2026-01-03 10:00:00",
                "2026-01-03 11:30:00",
                None,
                "2026-02-01 00:05:00",
                "2026-02-10 23:59:59",
            ],
            "dropoff": [
                "2026-01-03 10:12:30",
                "2026-01-03 12:00:00",
                "2026-01-04 00:00:00",
                None,
                "2026-02-11 00:20:00",
            ],
            "fare": ["12.5", " 7 ", "", None, "30.25"],
            "payment": ["card", "cash", "card", None, "other"],
            "zone": ["1", "2", "3", "2", "9"],
        }
    )


# ------------------------------------------------------------------ column steps


def test_select_keeps_the_order_given(trips: pd.DataFrame) -> None:
    result, rejects = run(trips, {"op": "select", "columns": ["zone", "fare"]})
    assert list(result.columns) == ["zone", "fare"] and rejects is None
    pd.testing.assert_frame_equal(result, trips[["zone", "fare"]])


def test_drop_and_rename(trips: pd.DataFrame) -> None:
    result, _ = run(trips, {"op": "drop", "columns": ["pickup"]}, {"op": "rename", "columns": {"fare": "fare_amount"}})
    assert list(result.columns) == ["dropoff", "fare_amount", "payment", "zone"]
    assert result["fare_amount"].tolist() == trips["fare"].tolist()


@pytest.mark.parametrize(
    "raw",
    [
        {"op": "select", "columns": ["fare", "tip"]},
        {"op": "drop", "columns": ["tip"]},
        {"op": "rename", "columns": {"tip": "t"}},
        {"op": "dropna", "columns": ["tip"]},
        {"op": "fillna", "values": {"tip": 0}},
        {"op": "cast", "columns": {"tip": "float64"}},
    ],
)
def test_unknown_column_names_it_and_lists_the_available_ones(trips: pd.DataFrame, raw: dict) -> None:
    with pytest.raises(StepError) as info:
        run(trips, {"op": "select", "columns": list(trips.columns)}, raw)
    err = info.value
    assert err.step == f"transform.steps[1] ({raw['op']})"
    assert err.item == "trips.csv[chunk 0]"
    assert "unknown column 'tip'; available columns: pickup, dropoff, fare, payment, zone" in str(err)


def test_rename_onto_an_existing_column_is_refused(trips: pd.DataFrame) -> None:
    with pytest.raises(StepError, match="two columns named 'zone'"):
        run(trips, {"op": "rename", "columns": {"payment": "zone"}})


# ------------------------------------------------------------------------- casts


def ref_int(text: str) -> int | None:
    """Reference parser for integer casts, written independently of the step's vector code."""
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        f = float(t)  # raises for non-numbers: a bad value
        if not f.is_integer() or abs(f) > 2**53:
            raise
        return int(f)


REF_BOOL = {
    "true": True,
    "t": True,
    "yes": True,
    "y": True,
    "1": True,
    "false": False,
    "f": False,
    "no": False,
    "n": False,
    "0": False,
}

MESSY_NUMBERS = [
    " 12 ",
    "+7",
    "-3",
    "007",
    "12.0",
    "1e3",
    "12.5",
    "abc",
    "",
    "   ",
    None,
    "1,5",
    "0x10",
    "9223372036854775807",
    "9223372036854775808",
    "3000000000",
    ".5",
    "-inf",
    "1_000",
]


def reference(kind: str, values: list[str | None]) -> tuple[list[Any], list[bool]]:
    """Expected values and bad flags for a cast, by plain Python rules."""
    out, bad = [], []
    for v in values:
        if v is None or not v.strip():
            out.append(None), bad.append(False)
            continue
        try:
            if kind in ("int64", "Int64", "int32", "Int32"):
                x: Any = ref_int(v)
                limit = 2**63 if "64" in kind else 2**31
                if not -limit <= x < limit:
                    raise ValueError(v)
                if "_" in v or "x" in v:
                    raise ValueError(v)  # Python's int() accepts these; the job grammar does not
            elif kind in ("float64", "float32"):
                if "_" in v or "x" in v:
                    raise ValueError(v)
                x = float(v.strip())
            else:
                x = REF_BOOL[v.strip().lower()]
        except (ValueError, KeyError):
            out.append(None), bad.append(True)
            continue
        out.append(x), bad.append(False)
    return out, bad


NUMBER_DTYPES = {
    "int64": "int64[pyarrow]",
    "Int64": "Int64",
    "int32": "int32[pyarrow]",
    "Int32": "Int32",
    "float64": "double[pyarrow]",
    "float32": "float[pyarrow]",
}


@pytest.mark.parametrize("kind", list(NUMBER_DTYPES))
def test_number_casts_of_messy_text(kind: str) -> None:
    series = text_chunk({"v": MESSY_NUMBERS})["v"]
    result, bad = cast_column(series, kind)
    expected, expected_bad = reference(kind, MESSY_NUMBERS)
    assert str(result.dtype) == NUMBER_DTYPES[kind]
    assert bad.tolist() == expected_bad
    got = vals(result)
    if kind == "float32":
        assert got == [None if e is None else pytest.approx(e, rel=1e-6) for e in expected]
    else:
        assert got == expected
    assert list(result.index) == list(series.index)


@pytest.mark.parametrize(("kind", "dtype"), [("bool", "bool[pyarrow]"), ("boolean", "boolean")])
def test_bool_casts_of_messy_text(kind: str, dtype: str) -> None:
    values = ["true", " FALSE ", "Yes", "n", "1", "0", "T", "maybe", "", None, "2"]
    result, bad = cast_column(text_chunk({"v": values})["v"], kind)
    expected, expected_bad = reference(kind, values)
    assert str(result.dtype) == dtype
    assert vals(result) == expected and bad.tolist() == expected_bad


def test_string_and_category_casts_keep_the_text() -> None:
    values = [" a ", "b", None, "a", ""]
    s = text_chunk({"v": values})["v"]
    as_string, bad = cast_column(s, "string")
    assert as_string.dtype == pd.ArrowDtype(pa.string()) and vals(as_string) == values and not bad.any()
    as_category, bad = cast_column(s, "category")
    assert as_category.dtype == pd.ArrowDtype(pa.dictionary(pa.int32(), pa.string()))
    assert vals(as_category) == values and not bad.any()
    numbers, _ = cast_column(pd.Series([1, 2, None], dtype="Int64"), "string")
    assert vals(numbers) == ["1", "2", None]


def test_timestamp_and_date_casts_of_messy_text() -> None:
    values = [
        "2026-01-03 10:00:00",
        " 2026-01-03T11:30:00 ",
        "2026-01-03",
        "2026-01-03T10:00:00+02:00",
        "2026-02-30",
        "yesterday",
        "-0",
        "",
        None,
    ]
    s = text_chunk({"v": values})["v"]
    ts, bad = cast_column(s, "timestamp")
    assert str(ts.dtype) == "timestamp[us][pyarrow]"
    good = [v.strip() for v in values[:4]]
    expected = [pd.Timestamp(v).tz_convert("UTC").tz_localize(None) if "+" in v else pd.Timestamp(v) for v in good]
    assert vals(ts) == expected + [None] * 5
    assert bad.tolist() == [False] * 4 + [True] * 3 + [False] * 2
    dates, bad = cast_column(s, "date")
    assert str(dates.dtype) == "date32[day][pyarrow]"
    assert vals(dates) == [e.date() for e in expected] + [None] * 5


def test_timestamp_cast_with_a_format() -> None:
    s = text_chunk({"v": ["03/01/2026 10:00", "31/12/2025 23:59", "2026-01-03 10:00"]})["v"]
    result, bad = cast_column(s, "timestamp", "%d/%m/%Y %H:%M")
    expected = pd.to_datetime(pd.Series(["03/01/2026 10:00", "31/12/2025 23:59"]), format="%d/%m/%Y %H:%M")
    assert vals(result)[:2] == expected.tolist() and bad.tolist() == [False, False, True]


def test_cast_from_typed_columns() -> None:
    floats = pd.Series([1.0, 2.5, None, -4.0], dtype="Float64", index=range(5, 9))
    result, bad = cast_column(floats, "int64")
    assert vals(result) == [1, None, None, -4] and bad.tolist() == [False, True, False, False]
    big = pd.Series([1, 2**40], dtype="int64[pyarrow]")
    result, bad = cast_column(big, "Int32")
    assert vals(result) == [1, None] and bad.tolist() == [False, True]
    aware = pd.Series(pd.to_datetime(["2026-01-01 12:00+01:00"], utc=True))
    assert vals(cast_column(aware, "timestamp")[0]) == [pd.Timestamp("2026-01-01 11:00")]


def test_cast_dtype_does_not_depend_on_the_values() -> None:
    """An all-null or empty chunk must give the same dtype as a full one (parts must concat)."""
    kinds = [*NUMBER_DTYPES, "bool", "boolean", "string", "category", "timestamp", "date"]
    for kind in kinds:
        full = cast_column(text_chunk({"v": ["1", "0"]})["v"], kind)[0].dtype
        nulls = cast_column(text_chunk({"v": [None, None]})["v"], kind)[0].dtype
        empty = cast_column(text_chunk({"v": []})["v"], kind)[0].dtype
        assert full == nulls == empty, kind


def test_parse_datetime_naive_and_utc(trips: pd.DataFrame) -> None:
    result, _ = run(trips, {"op": "parse_datetime", "columns": ["pickup", "dropoff"]})
    assert str(result["pickup"].dtype) == "timestamp[us][pyarrow]"
    assert vals(result["pickup"]) == vals(pd.to_datetime(trips["pickup"].astype(object)))
    result, _ = run(trips, {"op": "parse_datetime", "columns": ["pickup"], "utc": True})
    assert str(result["pickup"].dtype) == "timestamp[us, tz=UTC][pyarrow]"
    assert result["pickup"].iloc[0] == pd.Timestamp("2026-01-03 10:00", tz="UTC")


# --------------------------------------------------------------- bad values policy


def test_bad_value_fails_naming_column_row_and_value(trips: pd.DataFrame) -> None:
    chunk = trips.copy()
    chunk.loc[START + 3, "fare"] = "abc"
    with pytest.raises(StepError) as info:
        run(
            chunk,
            {"op": "select", "columns": ["fare", "zone"]},
            {"op": "cast", "columns": {"fare": "float64"}},
        )
    err = info.value
    assert err.step == "transform.steps[1] (cast)"
    assert err.message == f"column 'fare': cannot cast 'abc' to float64 at row {START + 3}"
    assert "trips.csv[chunk 0]" in str(err)


def test_bad_datetime_fails_naming_the_format(trips: pd.DataFrame) -> None:
    with pytest.raises(
        StepError, match=r"cannot cast '2026-01-03 10:00:00' to timestamp \(format '%d/%m/%Y'\) at row 1000"
    ):
        run(trips, {"op": "parse_datetime", "columns": ["pickup"], "format": "%d/%m/%Y"})


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
def test_rejected_rows_are_removed_and_returned(trips: pd.DataFrame, policy: str) -> None:
    chunk = trips.copy()
    chunk.loc[START + 1, "fare"] = "seven"
    chunk.loc[START + 4, "zone"] = "nine"
    chunk.loc[START + 1, "zone"] = "two"  # a second bad value in a row already rejected
    result, rejects = run(
        chunk,
        {"op": "cast", "columns": {"fare": "float64"}},
        {"op": "filter", "expr": "isnull(fare) or fare > 0"},
        {"op": "cast", "columns": {"zone": "int64"}},
        on_error=policy,
    )
    assert result.index.tolist() == [START, START + 2, START + 3]
    assert result["fare"].dtype == pd.ArrowDtype(pa.float64())
    assert rejects is not None
    assert {c: str(t) for c, t in rejects.dtypes.items()} == {
        "_row": "int64[pyarrow]",
        "_step": "string[pyarrow]",
        "_reason": "string[pyarrow]",
        "_raw": "string[pyarrow]",
    }
    assert rejects["_row"].tolist() == [START + 1, START + 4]
    assert rejects["_step"].tolist() == ["transform.steps[0] (cast)", "transform.steps[2] (cast)"]
    assert rejects["_reason"].tolist() == [
        "column 'fare': cannot cast 'seven' to float64",
        "column 'zone': cannot cast 'nine' to int64",
    ]
    for row, raw in zip(rejects["_row"], rejects["_raw"]):
        assert json.loads(raw) == {k: (None if pd.isna(v) else v) for k, v in chunk.loc[row].items()}


def test_row_accounting_invariant(trips: pd.DataFrame) -> None:
    """len(result) + len(rejects) == len(input) - rows dropped by filter/dropna."""
    chunk = pd.concat([trips] * 20, ignore_index=True)
    chunk.index = pd.RangeIndex(START, START + len(chunk))
    rng = np.random.default_rng(7)
    messy = rng.choice(np.array(["1.5", "x", "", " 4 ", "-2"], dtype=object), len(chunk))
    chunk["fare"] = pd.array(messy, dtype="string[pyarrow]")
    result, rejects = run(
        chunk,
        {"op": "cast", "columns": {"fare": "float64"}},
        {"op": "dropna", "columns": ["payment"]},
        {"op": "filter", "expr": "fare > 0"},
        on_error="skip",
    )
    parsed = pd.to_numeric(chunk["fare"].astype(object).str.strip().replace("", None), errors="coerce")
    is_bad = chunk["fare"].notna() & (chunk["fare"].str.strip() != "") & parsed.isna()
    survivors = ~is_bad & chunk["payment"].notna()
    kept = survivors & (parsed > 0)
    assert len(rejects) == int(is_bad.sum())
    assert len(result) == int(kept.sum())
    dropped = int((survivors & ~(parsed > 0)).sum()) + int((~is_bad & chunk["payment"].isna()).sum())
    assert len(result) + len(rejects) == len(chunk) - dropped
    assert result.index.tolist() == chunk.index[kept].tolist()


# -------------------------------------------------------------- filter, derive, nulls


def test_filter_keeps_true_rows_with_their_source_row_numbers(trips: pd.DataFrame) -> None:
    result, _ = run(trips, {"op": "cast", "columns": {"fare": "float64"}}, {"op": "filter", "expr": "fare >= 10"})
    fare = pd.to_numeric(trips["fare"].astype(object).str.strip().replace("", None))
    assert result.index.tolist() == trips.index[(fare >= 10).fillna(False).astype(bool)].tolist()


def test_filter_must_be_boolean(trips: pd.DataFrame) -> None:
    with pytest.raises(StepError, match=r"transform.steps\[0\] \(filter\).*must give true/false"):
        run(trips, {"op": "filter", "expr": "zone + 'x'"})


def test_derive_in_order_with_constants(trips: pd.DataFrame) -> None:
    result, _ = run(
        trips,
        {"op": "parse_datetime", "columns": ["pickup", "dropoff"]},
        {
            "op": "derive",
            "columns": {
                "minutes": "minutes(dropoff - pickup)",
                "long": "minutes > 20",
                "month": "strftime(pickup, '%Y-%m')",
                "source": "'nyc'",
            },
        },
    )
    pickup = pd.to_datetime(trips["pickup"].astype(object))
    dropoff = pd.to_datetime(trips["dropoff"].astype(object))
    expected = (dropoff - pickup).dt.total_seconds() / 60
    assert vals(result["minutes"]) == vals(expected)
    assert vals(result["long"]) == vals((expected > 20).astype(object).where(expected.notna(), None))
    assert vals(result["month"]) == vals(pickup.dt.strftime("%Y-%m"))
    assert result["source"].tolist() == ["nyc"] * len(trips)
    assert result.index.equals(trips.index)


def test_derive_unknown_column_is_a_step_error_with_the_cause(trips: pd.DataFrame) -> None:
    with pytest.raises(StepError, match=r"unknown column 'tip' in 'tip \* 2'; available columns: pickup") as info:
        run(trips, {"op": "derive", "columns": {"t": "tip * 2"}})
    assert isinstance(info.value.__cause__, ValueError)


def test_fillna_keeps_types_and_refuses_lossy_values(trips: pd.DataFrame) -> None:
    result, _ = run(
        trips,
        {"op": "cast", "columns": {"fare": "float64", "zone": "Int64"}},
        {"op": "fillna", "values": {"fare": 0, "payment": "unknown"}},
    )
    assert vals(result["payment"]) == [v if v is not None else "unknown" for v in vals(trips["payment"])]
    assert result["fare"].dtype == pd.ArrowDtype(pa.float64()) and result["fare"].notna().all()
    with pytest.raises(StepError, match=r"cannot fill nulls of column 'zone' \(Int64\) with 0.5"):
        run(trips, {"op": "cast", "columns": {"zone": "Int64"}}, {"op": "fillna", "values": {"zone": 0.5}})


@pytest.mark.parametrize("how", ["any", "all"])
def test_dropna_matches_pandas(trips: pd.DataFrame, how: str) -> None:
    result, _ = run(trips, {"op": "dropna", "columns": ["pickup", "dropoff"], "how": how})
    pd.testing.assert_frame_equal(result, trips.dropna(subset=["pickup", "dropoff"], how=how))
    everything, _ = run(trips, {"op": "dropna"})
    pd.testing.assert_frame_equal(everything, trips.dropna())


# ------------------------------------------------------------------------- lookup


@pytest.fixture
def zones_csv(tmp_path: Path) -> Path:
    path = tmp_path / "zones.csv"
    path.write_text("LocationID,Borough,Zone\n1,EWR,Newark\n2,Queens,Jamaica Bay\n3,Bronx,Allerton\n007,X,Leading\n")
    return path


def test_lookup_left_joins_keeping_rows_order_and_index(trips: pd.DataFrame, zones_csv: Path) -> None:
    result, _ = run(trips, {"op": "lookup", "path": str(zones_csv), "on": "zone", "right_on": "LocationID"})
    table = pd.read_csv(zones_csv, dtype=str)
    expected = trips.astype(object).merge(table, how="left", left_on="zone", right_on="LocationID")
    assert result.index.equals(trips.index)
    assert list(result.columns) == [*trips.columns, "Borough", "Zone"]
    assert vals(result["Borough"]) == vals(expected["Borough"])
    assert vals(result["Zone"]) == vals(expected["Zone"])


def test_lookup_casts_the_table_key_to_the_chunk_key_type(trips: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "zones.parquet"
    pq.write_table(pa.table({"zone": pa.array(["1", "2", "9"]), "rate": pa.array([1.5, 2.5, 9.5])}), path)
    result, _ = run(
        trips,
        {"op": "cast", "columns": {"zone": "int64"}},
        {"op": "lookup", "path": str(path), "on": "zone", "columns": ["rate"]},
    )
    assert vals(result["rate"]) == [1.5, 2.5, None, 2.5, 9.5]
    assert result["rate"].dtype == pd.ArrowDtype(pa.float64())


def test_lookup_on_two_keys_with_unmatched_and_null_keys(tmp_path: Path) -> None:
    path = tmp_path / "rates.csv"
    path.write_text("a,b,rate\n1,x,10\n1,y,11\n2,x,20\n,x,99\n")
    chunk = text_chunk({"a": ["1", "2", "1", None, "3"], "b": ["y", "x", "x", "x", "x"]})
    result, _ = run(chunk, {"op": "lookup", "path": str(path), "on": ["a", "b"]})
    assert vals(result["rate"]) == ["11", "20", "10", None, None]


def test_lookup_duplicate_key_is_an_error(trips: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "dups.csv"
    path.write_text("zone,name\n1,a\n2,b\n1,c\n")
    with pytest.raises(StepError, match=r"dups.csv has key '1' more than once"):
        run(trips, {"op": "lookup", "path": str(path), "on": "zone"})


def test_lookup_column_clash_and_missing_table(trips: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("zone,payment\n1,x\n")
    with pytest.raises(StepError, match="would overwrite column 'payment'"):
        run(trips, {"op": "lookup", "path": str(path), "on": "zone"})
    with pytest.raises(StepError, match="lookup table not found: .*missing.csv"):
        run(trips, {"op": "lookup", "path": str(tmp_path / "missing.csv"), "on": "zone"})


def test_lookup_table_is_read_once_and_again_when_it_changes(trips: pd.DataFrame, zones_csv: Path) -> None:
    step = {"op": "lookup", "path": str(zones_csv), "on": "zone", "right_on": "LocationID"}
    before = read_lookup_table.cache_info().misses
    for start in range(0, 50, 10):  # five chunks
        run(text_chunk({"zone": ["1", "3"]}, start=start), step)
    assert read_lookup_table.cache_info().misses == before + 1
    zones_csv.write_text("LocationID,Borough,Zone\n1,Changed,Z\n")
    os.utime(zones_csv, ns=(1, 1))  # a different mtime even on coarse clocks
    result, _ = run(text_chunk({"zone": ["1"]}), step)
    assert read_lookup_table.cache_info().misses == before + 2
    assert result["Borough"].tolist() == ["Changed"]


def _chunks_in_worker(path: str) -> int:
    for start in range(0, 40, 10):
        run(
            text_chunk({"zone": ["1", "2"]}, start=start),
            {"op": "lookup", "path": path, "on": "zone", "right_on": "LocationID"},
        )
    return read_lookup_table.cache_info().misses


def test_lookup_is_read_once_per_worker_process(zones_csv: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # a fresh process, like a transform worker
    with ctx.Pool(1) as pool:
        assert pool.apply(_chunks_in_worker, (str(zones_csv),)) == 1


# ------------------------------------------------------------------------- python


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "my_steps.py").write_text(
        textwrap.dedent(
            """
            import pandas as pd

            def scale(df, column, factor=1):
                out = df.copy()
                out[column] = out[column].astype("float64[pyarrow]") * factor
                return out

            def not_a_frame(df):
                return len(df)

            def broken(df):
                raise RuntimeError("boom in user code")
            """
        )
    )
    return tmp_path


def test_python_step_gets_params_and_base_dir_is_importable(trips: pd.DataFrame, job_dir: Path) -> None:
    result, _ = run(
        trips.iloc[[0, 1, 4]],
        {"op": "python", "function": "my_steps:scale", "params": {"column": "zone", "factor": 2.5}},
        base_dir=job_dir,
    )
    assert vals(result["zone"]) == [float(z) * 2.5 for z in trips["zone"].iloc[[0, 1, 4]]]
    assert vals(trips["zone"]) == ["1", "2", "3", "2", "9"]  # the caller's frame is untouched


def test_python_step_must_return_a_dataframe(trips: pd.DataFrame, job_dir: Path) -> None:
    with pytest.raises(StepError, match=r"my_steps:not_a_frame returned int, expected a pandas DataFrame"):
        run(trips, {"op": "python", "function": "my_steps:not_a_frame"}, base_dir=job_dir)


def test_python_step_exception_is_chained(trips: pd.DataFrame, job_dir: Path) -> None:
    with pytest.raises(StepError, match=r"RuntimeError: boom in user code") as info:
        run(
            trips,
            {"op": "select", "columns": ["zone"]},
            {"op": "python", "function": "my_steps:broken"},
            base_dir=job_dir,
        )
    assert info.value.step == "transform.steps[1] (python)"
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("raw", "key", "text"),
    [
        ({"op": "filter", "expr": "foo(x)"}, "expr", "unknown function 'foo'"),
        ({"op": "derive", "columns": {"ok": "a + 1", "bad": "a +"}}, "columns.bad", "syntax error"),
        ({"op": "python", "function": "nowhere:fn"}, "function", "cannot import 'nowhere'"),
        ({"op": "python", "function": "my_steps:missing"}, "function", "has no function 'missing'"),
        ({"op": "lookup", "path": "missing.csv", "on": "z"}, "path", "not found"),
        ({"op": "lookup", "path": "zones.csv", "on": "z"}, "on", "has no column 'z'"),
        (
            {"op": "lookup", "path": "zones.csv", "on": "z", "right_on": "LocationID", "columns": ["Nope"]},
            "columns",
            "has no column 'Nope'",
        ),
        ({"op": "lookup", "path": "dups.csv", "on": "k"}, "on", "more than once"),
        (
            {"op": "lookup", "path": "zones.csv", "on": ["a", "b"], "right_on": "LocationID"},
            "right_on",
            "'on' names 2 key column(s) but 'right_on' names 1",
        ),
    ],
)
def test_validate_steps_names_the_key(job_dir: Path, raw: dict, key: str, text: str) -> None:
    (job_dir / "zones.csv").write_text("LocationID,Borough\n1,EWR\n")
    (job_dir / "dups.csv").write_text("k\n1\n1\n")
    with pytest.raises(ConfigError) as info:
        validate_steps(steps({"op": "select", "columns": ["a"]}, raw), job_dir, file="job.toml")
    assert info.value.item == f"transform.steps[1].{key}"
    assert text in str(info.value) and "job.toml" in str(info.value)


def test_validate_steps_accepts_a_good_list(job_dir: Path) -> None:
    (job_dir / "zones.csv").write_text("LocationID,Borough\n1,EWR\n")
    validate_steps(
        steps(
            {"op": "filter", "expr": "`trip distance` > 0 and payment in ('card', 'cash')"},
            {"op": "derive", "columns": {"m": "minutes(dropoff - pickup)"}},
            {"op": "python", "function": "my_steps:scale", "params": {"column": "m"}},
            {"op": "lookup", "path": "zones.csv", "on": "zone", "right_on": "LocationID"},
        ),
        job_dir,
    )


# ------------------------------------------------------------------ input flavours

FLAVOUR_ROWS = {
    "fare": ["12.5", " 3 ", "", None, "abc", "-1"],
    "n": ["1", "7.0", "x", None, "2", "3"],
    "flag": ["true", "F", "?", None, "yes", "n"],
    "payment": ["card", "cash", None, "other", "card", "card"],
    "pickup": ["2026-01-03 10:00:00", "nope", None, "2025-12-31", "2026-02-28T23:59:59", "2026-01-01"],
    "zone": ["1", "2", "3", "9", None, "1"],
}


@pytest.mark.parametrize("dtype", ["str", pd.ArrowDtype(pa.string()), pd.ArrowDtype(pa.large_string())])
def test_every_string_flavour_gives_the_same_result(job_dir: Path, dtype: Any) -> None:
    """The reader may hand over pandas' str, string[pyarrow] or Arrow (large_)string columns."""
    (job_dir / "zones.csv").write_text("LocationID,Borough\n1,EWR\n2,Queens\n3,Bronx\n")
    reference = text_chunk(FLAVOUR_ROWS)
    other = reference.astype(dtype)
    want, want_rejects = apply_steps(reference, steps(*PIPELINE), base_dir=job_dir, on_error="skip")
    got, got_rejects = apply_steps(other, steps(*PIPELINE), base_dir=job_dir, on_error="skip")
    pd.testing.assert_frame_equal(got, want)
    pd.testing.assert_frame_equal(got_rejects, want_rejects)
    assert len(want_rejects) > 0 and len(want) > 0


def test_rejects_from_typed_input_hold_plain_json(tmp_path: Path) -> None:
    """Parquet chunks keep their types; _raw still holds plain JSON values."""
    chunk = pd.DataFrame(
        {
            "big": pd.array([1, 2**40, None], dtype="int64[pyarrow]"),
            "at": pd.array([pd.Timestamp("2026-01-02 03:04:05.123456")] * 3, dtype="timestamp[us][pyarrow]"),
            "ratio": [0.5, float("nan"), 2.0],
        },
        index=pd.RangeIndex(40, 43),
    )
    result, rejects = run(chunk, {"op": "cast", "columns": {"big": "int32"}}, on_error="skip")
    assert result.index.tolist() == [40, 42]
    assert rejects["_reason"].tolist() == [f"column 'big': cannot cast {2**40} to int32"]
    assert json.loads(rejects["_raw"].iloc[0]) == {
        "big": 2**40,
        "at": "2026-01-02T03:04:05.123456",
        "ratio": None,
    }


# ------------------------------------------------------------------- chunking property

PIPELINE = [
    {"op": "cast", "columns": {"fare": "float64", "n": "Int64", "flag": "boolean", "payment": "category"}},
    {"op": "parse_datetime", "columns": ["pickup"]},
    {"op": "filter", "expr": "isnull(fare) or fare >= 0"},
    {
        "op": "derive",
        "columns": {"month": "strftime(pickup, '%Y-%m')", "half": "n // 2", "total": "fare * 1.1 + n"},
    },
    {"op": "fillna", "values": {"month": "unknown"}},
    {"op": "lookup", "path": "zones.csv", "on": "zone", "right_on": "LocationID", "columns": ["Borough"]},
    {"op": "cast", "columns": {"n": "int32"}},
    {"op": "dropna", "columns": ["fare", "pickup"], "how": "all"},
    {
        "op": "select",
        "columns": ["pickup", "month", "fare", "n", "half", "total", "payment", "flag", "Borough"],
    },
]

row_strategy = st.fixed_dictionaries(
    {
        "fare": st.sampled_from(["12.5", " 3 ", "-1", "", None, "abc", "1e2", "0"]),
        "n": st.sampled_from(["1", " 2", "7.0", "x", None, "-5", "3000000000"]),
        "flag": st.sampled_from(["true", "F", "yes", "?", None]),
        "payment": st.sampled_from(["card", "cash", None, "other"]),
        "pickup": st.sampled_from(["2026-01-03 10:00:00", "2026-02-28T23:59:59", "nope", None, "2025-12-31"]),
        "zone": st.sampled_from(["1", "2", "3", "9", None]),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_strategy, min_size=1, max_size=40), data=st.data())
def test_chunking_does_not_change_the_result(job_dir: Path, rows: list[dict], data: st.DataObject) -> None:
    (job_dir / "zones.csv").write_text("LocationID,Borough\n1,EWR\n2,Queens\n3,Bronx\n")
    frame = text_chunk({k: [r[k] for r in rows] for k in rows[0]}, start=500)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(rows) - 1), max_size=5)) if len(rows) > 1 else set())
    bounds = [0, *cuts, len(rows)]
    whole, whole_rejects = apply_steps(frame, steps(*PIPELINE), base_dir=job_dir, on_error="skip")
    parts, part_rejects = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        result, rejects = apply_steps(frame.iloc[lo:hi], steps(*PIPELINE), base_dir=job_dir, on_error="skip")
        parts.append(result)
        if rejects is not None:
            part_rejects.append(rejects)
    pd.testing.assert_frame_equal(pd.concat(parts), whole)
    if whole_rejects is None:
        assert not part_rejects
    else:
        order = ["_row", "_step"]
        joined = pd.concat(part_rejects).sort_values(order).reset_index(drop=True)
        pd.testing.assert_frame_equal(joined, whole_rejects.sort_values(order).reset_index(drop=True))


# -------------------------------------------------------------------------------- sql


def typed(trips: pd.DataFrame) -> pd.DataFrame:
    result, _ = run(
        trips,
        {"op": "cast", "columns": {"fare": "float64", "zone": "int64", "payment": "category"}},
        {"op": "parse_datetime", "columns": ["pickup", "dropoff"]},
    )
    return result


def test_sql_is_row_wise_keeps_row_numbers_and_passes_columns_as_they_are(trips: pd.DataFrame) -> None:
    df = typed(trips)
    result, rejects = apply_steps(
        df,
        steps({"op": "sql", "query": "SELECT *, fare / zone AS rate, upper(payment) AS pay FROM chunk WHERE fare > 7"}),
        base_dir=Path("."),
        label="t",
    )
    assert rejects is None
    assert list(result.index) == [START, START + 4]  # row numbers survive, in order
    assert list(result.columns) == [*df.columns, "rate", "pay"]
    for col in df.columns:  # passed through untouched: same dtype (category, timestamps), same values
        assert result[col].dtype == df[col].dtype
        assert vals(result[col]) == vals(df[col].loc[result.index])
    assert vals(result["rate"]) == [12.5, 30.25 / 9] and vals(result["pay"]) == ["CARD", "OTHER"]


def test_sql_nulls_and_division_match_the_expression_steps(trips: pd.DataFrame) -> None:
    df = typed(trips)
    sql, _ = run(
        df, {"op": "sql", "query": "SELECT fare / (zone - zone) AS d, fare > 10 AS big, fare + 1 AS f1 FROM chunk"}
    )
    expr, _ = run(
        df,
        {"op": "derive", "columns": {"d": "fare / (zone - zone)", "big": "fare > 10", "f1": "fare + 1"}},
        {"op": "select", "columns": ["d", "big", "f1"]},
    )
    for col in ("d", "big", "f1"):
        assert vals(sql[col]) == vals(expr[col])
        assert str(sql[col].dtype) == str(expr[col].dtype)
    assert vals(sql["d"])[:2] == [math.inf, math.inf] and vals(sql["big"]) == [True, False, None, None, True]
    kept, _ = run(df, {"op": "sql", "query": "SELECT * FROM chunk WHERE fare > 10 OR payment = 'cash'"})
    filtered, _ = run(df, {"op": "filter", "expr": "fare > 10 or payment == 'cash'"})
    assert list(kept.index) == list(filtered.index)  # a null condition drops the row, in both


@pytest.mark.parametrize(
    "query, says",
    [
        ("SELECT count(*) FROM chunk", "count() is not row-wise"),
        ("SELECT sum(fare) AS s FROM chunk", "sum() is not row-wise"),
        ("SELECT fare, row_number() OVER () AS n FROM chunk", "window functions"),
        ("SELECT * FROM chunk ORDER BY fare", "ORDER BY is not allowed"),
        ("SELECT * FROM chunk LIMIT 10", "LIMIT is not allowed"),
        ("SELECT DISTINCT zone FROM chunk", "DISTINCT is not allowed"),
        ("SELECT zone FROM chunk GROUP BY zone", "GROUP BY is not allowed"),
        ("SELECT * FROM chunk c JOIN chunk d USING (zone)", "FROM chunk, and only chunk"),
        ("SELECT * FROM other", "FROM chunk, and only chunk"),
        ("SELECT *, (SELECT max(fare) FROM chunk) AS m FROM chunk", "subqueries are not allowed"),
        ("SELECT * FROM chunk UNION ALL SELECT * FROM chunk", "no UNION"),
        ("WITH c AS (SELECT * FROM chunk) SELECT * FROM c", "WITH is not allowed"),
        ("SELECT unnest([1, 2]) AS x FROM chunk", "unnest() is not row-wise"),
        ("SELEC * FROM chunk", "not valid SQL: syntax error"),
        ("SELECT 1; SELECT 2", "one SELECT statement"),
    ],
)
def test_sql_that_is_not_row_wise_or_not_sql_is_refused_at_validation(query: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate_steps(steps({"op": "filter", "expr": "fare > 0"}, {"op": "sql", "query": query}), Path("."))
    assert exc.value.item == "transform.steps[1].query" and exc.value.exit_code == 2
    assert says in exc.value.message and exc.value.message.startswith("sql step: ")


def test_sql_unknown_column_is_a_job_file_error_naming_the_step(trips: pd.DataFrame) -> None:
    with pytest.raises(StepError) as exc:
        run(typed(trips), {"op": "sql", "query": "SELECT fare, tip FROM chunk"})
    err = exc.value
    assert err.exit_code == 2 and err.step == "transform.steps[0] (sql)"
    assert '"tip" not found' in err.message and "key transform.steps[0].query" in err.message
    assert "the chunk's columns: pickup, dropoff, fare, payment, zone" in err.message
    with pytest.raises(StepError) as twice:
        run(typed(trips), {"op": "sql", "query": "SELECT fare, zone AS fare FROM chunk"})
    assert "two columns named 'fare'" in twice.value.message and twice.value.exit_code == 2


def _arrow_round(expr: str) -> str:
    """The expression steps' round(x, 1) in SQL: Arrow's kernel (half-to-even of x*10, over 10,
    x itself when x*10 is whole); DuckDB's round_even(x, 1) rounds the decimal value instead."""
    return f"CASE WHEN ({expr}) * 10 = trunc(({expr}) * 10) THEN ({expr}) ELSE round_even(({expr}) * 10, 0) / 10 END"


def test_the_example_job_with_its_filter_and_derive_in_sql_publishes_identical_data(tmp_path: Path) -> None:
    from etl.api import run_job

    root = Path(__file__).resolve().parents[2]
    text = (root / "config" / "example.toml").read_text()
    filter_step = 'op = "filter"\nexpr = "fare >= 0 and distance_mi > 0"'
    derive_start = text.index('op = "derive"')
    derive_step = text[derive_start : text.index("\n\n", derive_start)]
    # minutes(a - b) is the difference in microseconds times 1e-6 / 60, as a float
    minutes = f"(epoch_us(dropoff_at) - epoch_us(pickup_at))::DOUBLE * {1e-6 / 60!r}"
    duration = _arrow_round(minutes)
    query = f"""
        SELECT *,
          {duration} AS duration_min,
          {_arrow_round("distance_mi / (duration_min / 60)")} AS mph,
          CASE WHEN fare > 0 THEN {_arrow_round("tip / fare * 100")} ELSE 0.0 END AS tip_pct,
          strftime(pickup_at, '%Y-%m') AS month,
          store_and_fwd = 'Y' AS delayed_upload
        FROM chunk"""
    sql_text = text.replace(
        filter_step, 'op = "sql"\nquery = "SELECT * FROM chunk WHERE fare >= 0 AND distance_mi > 0"'
    )
    sql_text = sql_text.replace(derive_step, f'op = "sql"\nquery = """{query}"""')
    assert sql_text.count('op = "sql"') == 2 and 'op = "derive"' not in sql_text and 'op = "filter"' not in sql_text
    tables = []
    for name, job in (("expr", text), ("sql", sql_text)):
        folder = tmp_path / name / "config"
        folder.mkdir(parents=True)
        for f in ("sample_udf.py",):
            (folder / f).write_text((root / "config" / f).read_text())
        job = job.replace("../sample_data/", f"{root}/sample_data/")
        (folder / "job.toml").write_text(job)
        result = run_job(folder / "job.toml", ["transform.executor=thread"])
        assert result.exit_code == 3, result.error  # the sample's bad values are quarantined
        tables.append(pq.ParquetDataset(tmp_path / name / "out" / "example").read().sort_by("trip_id"))
    expr_table, sql_table = tables
    assert sql_table.schema == expr_table.schema
    assert sql_table.num_rows == expr_table.num_rows > 50_000
    assert sql_table.equals(expr_table)


def test_validate_steps_reports_every_bad_step_at_once(job_dir: Path) -> None:
    bad = steps(
        {"op": "filter", "expr": "fare >"},
        {"op": "derive", "columns": {"a": "fare +", "b": "fare * 2", "c": "nope("}},
        {"op": "lookup", "path": "missing.csv", "on": "zone", "columns": ["x"]},
        {"op": "sql", "query": "SELECT sum(fare) AS s FROM chunk"},
    )
    with pytest.raises(ConfigError) as exc:
        validate_steps(bad, job_dir)
    keys = [k for k, _ in exc.value.problems]
    assert keys == [
        "transform.steps[0].expr",
        "transform.steps[1].columns.a",
        "transform.steps[1].columns.c",
        "transform.steps[2].path",
        "transform.steps[3].query",
    ]
    assert exc.value.item == "transform.steps[0].expr" and str(exc.value).count("\n  key ") == 5


# ------------------------------------------------------------------- typed parsing


def test_typed_columns_are_the_first_casts_before_any_other_step() -> None:
    job = steps(
        {"op": "select", "columns": ["a", "b", "c", "d", "e"]},
        {"op": "parse_datetime", "columns": ["e"]},
        {"op": "cast", "columns": {"a": "float64", "b": "Int64", "c": "int32", "e": "int64"}},
        {"op": "cast", "columns": {"a": "int64", "d": "int64"}},
        {"op": "rename", "columns": {"b": "bb"}},
        {"op": "cast", "columns": {"f": "float64"}},
    )
    assert typed_columns(job) == {"a": pa.float64(), "b": pa.int64(), "d": pa.int64()}
    fill_first = steps({"op": "fillna", "values": {"a": 0}}, {"op": "cast", "columns": {"a": "int64"}})
    assert typed_columns(fill_first) == {}


_number_text = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " 1 ", "\t2", "+3", "007", "1e3", "12.0", "0x1F", "n/a", "-0", ".5", "1.", "nan", "inf", " "]),
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.tuples(_number_text, _number_text), min_size=1, max_size=12),
    on_error=st.sampled_from(["fail", "quarantine"]),
)
def test_typed_parse_then_cast_equals_text_parse_then_cast(values: list[tuple[str, str]], on_error: str) -> None:
    """Whatever the values, a chunk parsed with typed_columns and cast gives the same frame
    or the same error as one parsed as text (bad values named alike); with rejects the
    worker parses the chunk again as text (tests/transform/test_worker.py)."""
    job = steps({"op": "cast", "columns": {"n": "int64", "x": "float64"}})
    body = "".join(f'"{a}",{b}\n' for a, b in values).encode()
    chunk = Chunk(0, "t.csv", 0, 2, body.count(b"\n"), body, kind="csv", columns=("n", "x"))

    def outcome(types: dict[str, pa.DataType] | None) -> object:
        df, _ = parse_csv_chunk(chunk, ReadConfig(), on_error, types)
        try:
            out, rejects = apply_steps(df, job, base_dir=Path("."), on_error=on_error, label="t.csv", unit="line")
        except StepError as e:
            return str(e)
        return "rejects" if rejects is not None else out

    typed, text = outcome(typed_columns(job)), outcome(None)
    if isinstance(text, pd.DataFrame):
        assert isinstance(typed, pd.DataFrame)
        pd.testing.assert_frame_equal(typed, text)
    else:
        assert typed == text

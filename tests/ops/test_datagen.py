"""The synthetic dataset: deterministic bytes, exact row counts, the promised mess, all formats."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from etl.core.errors import ConfigError
from etl.ops import datagen
from etl.ops.datagen import COLUMNS, ZONE_COUNT, generate

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def read_csv(path: Path) -> pa.Table:
    """Read like the pipeline does: every column a string, only empty cells null (pyarrow's
    default null list would also turn the ``n/a`` bad values into nulls)."""
    with pa_csv.open_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True)) as r:
        names = r.schema.names
    return pa_csv.read_csv(
        path,
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            null_values=[""],
            strings_can_be_null=True,
        ),
    )


def read_trips(paths: list[Path]) -> pa.Table:
    return pa.concat_tables(read_csv(p) for p in paths if p.name.startswith("trips-"))


def count(mask: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)


def as_float(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(pc.utf8_trim_whitespace(col), pa.float64())


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    out = tmp_path_factory.mktemp("messy")
    return read_trips(generate(out, rows=20_000, files=2, seed=3))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", rows=3_000, files=3, seed=1, bad_values=0.01)
    b = generate(tmp_path / "b", rows=3_000, files=3, seed=1, bad_values=0.01)
    c = generate(tmp_path / "c", rows=3_000, files=3, seed=2, bad_values=0.01)
    assert [p.name for p in a] == ["trips-000.csv.gz", "trips-001.csv.gz", "trips-002.csv.gz", "zones.csv"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    for pa_, pc_ in zip(a[:3], c[:3]):
        assert pa_.read_bytes() != pc_.read_bytes()
    assert a[3].read_bytes() == c[3].read_bytes()  # the zone table does not depend on the seed


def test_same_bytes_whatever_the_number_of_worker_threads(tmp_path: Path) -> None:
    one = generate(tmp_path / "one", rows=2_000, files=4, workers=1, slice_rows=300)
    four = generate(tmp_path / "four", rows=2_000, files=4, workers=4, slice_rows=300)
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in four]


def test_rows_split_evenly_with_contiguous_ids_across_uneven_slices(tmp_path: Path) -> None:
    # 1003 rows in 3 files of 335/334/334, written in slices of 100: every slice boundary
    # falls mid-file, and only the first slice may write the header.
    paths = generate(tmp_path, rows=1_003, files=3, slice_rows=100)
    tables = [read_csv(p) for p in paths[:3]]
    assert [t.num_rows for t in tables] == [335, 334, 334]
    trips = pa.concat_tables(tables)
    assert trips.column_names == list(COLUMNS)
    assert pc.cast(trips["trip_id"], pa.int64()).to_pylist() == list(range(1, 1_004))
    assert not sorted(tmp_path.glob(".*"))  # no temp files left behind


def test_more_files_than_rows_gives_header_only_files(tmp_path: Path) -> None:
    paths = generate(tmp_path, rows=2, files=3)
    tables = [read_csv(p) for p in paths[:3]]
    assert [t.num_rows for t in tables] == [1, 1, 0]
    assert tables[2].column_names == list(COLUMNS)


def test_values_are_realistic_and_spread_over_months(messy: pa.Table) -> None:
    for col in ("pickup_at", "dropoff_at"):
        values = messy[col].drop_null().to_pylist()
        assert all(TIMESTAMP.match(v) for v in values)
    months = pc.unique(pc.utf8_slice_codeunits(messy["pickup_at"], 0, 7)).to_pylist()
    assert sorted(months) == [f"2024-0{m}" for m in range(1, 7)]
    later = pc.greater_equal(messy["dropoff_at"], messy["pickup_at"])  # ISO text sorts as time
    assert count(later) == len(messy["dropoff_at"].drop_null())
    assert set(messy["payment_type"].drop_null().to_pylist()) <= set(datagen.PAYMENT_TYPES)
    assert set(messy["store_and_fwd"].drop_null().to_pylist()) == {"Y", "N"}


def test_messy_shares_are_roughly_the_documented_ones(messy: pa.Table) -> None:
    n = messy.num_rows

    def roughly(k: int, share: float) -> bool:
        return 0.5 * share * n <= k <= 2 * share * n

    for col in datagen.EMPTY_COLUMNS:
        assert roughly(messy[col].null_count, datagen.EMPTY_SHARE), col
    for col in datagen.WHITESPACE_COLUMNS:
        padded = pc.not_equal(messy[col], pc.utf8_trim_whitespace(messy[col]))
        assert roughly(count(padded), datagen.WHITESPACE_SHARE), col
    assert roughly(count(pc.less(as_float(messy["fare_amount"]), 0)), datagen.NEGATIVE_FARE_SHARE)
    zero = pc.equal(as_float(messy["trip_distance"]), 0)
    assert roughly(count(zero), datagen.ZERO_DISTANCE_SHARE)
    unknown = pc.equal(messy["pickup_zone"], str(datagen.UNKNOWN_ZONE))
    assert roughly(count(unknown), datagen.UNKNOWN_ZONE_SHARE)


def test_messy_notes_keep_commas_quotes_and_newlines_through_csv(messy: pa.Table) -> None:
    notes = set(messy["notes"].drop_null().to_pylist())
    assert notes == set(datagen.PLAIN_NOTES + datagen.MESSY_NOTES)
    assert any("\n" in s for s in notes) and any('"' in s for s in notes)


def test_every_value_casts_when_bad_values_is_zero(messy: pa.Table) -> None:
    # The default dataset must pass a strict job: whitespace is the only mess in numbers.
    for col in ("passenger_count", "trip_distance", "fare_amount", "tip_amount", "total_amount"):
        as_float(messy[col])  # raises ArrowInvalid on any unparseable value
    for col in ("trip_id", "vendor_id", "pickup_zone", "dropoff_zone"):
        pc.cast(messy[col], pa.int64())


def test_bad_values_appear_only_when_asked_for(tmp_path: Path) -> None:
    trips = read_trips(generate(tmp_path, rows=20_000, files=1, bad_values=0.01))
    for col, bad in datagen.BAD_VALUES.items():
        k = count(pc.equal(trips[col], bad))
        assert 100 <= k <= 400, (col, k)  # ~1% of 20,000
        with pytest.raises(pa.ArrowInvalid):
            as_float(trips[col])


def test_tidy_dataset_has_no_mess(tmp_path: Path) -> None:
    trips = read_trips(generate(tmp_path, rows=5_000, files=1, messy=False))
    for col in COLUMNS[:-1]:  # only the notes may be empty
        assert trips[col].null_count == 0, col
    assert count(pc.less_equal(as_float(trips["trip_distance"]), 0)) == 0
    assert count(pc.less(as_float(trips["fare_amount"]), 0)) == 0
    for col in datagen.WHITESPACE_COLUMNS:
        assert count(pc.not_equal(trips[col], pc.utf8_trim_whitespace(trips[col]))) == 0
    zones = pc.cast(trips["pickup_zone"], pa.int64())
    assert pc.max(zones).as_py() <= ZONE_COUNT
    assert set(trips["notes"].drop_null().to_pylist()) <= set(datagen.PLAIN_NOTES)


def test_zone_table_covers_every_known_zone_id(tmp_path: Path) -> None:
    zones = read_csv(generate(tmp_path, rows=10, files=1)[-1])
    assert zones.column_names == ["zone_id", "borough", "zone_name"]
    assert zones["zone_id"].to_pylist() == [str(i) for i in range(1, ZONE_COUNT + 1)]
    assert len(set(zones["zone_name"].to_pylist())) == ZONE_COUNT
    assert set(zones["borough"].to_pylist()) == set(datagen.BOROUGHS)


def test_other_formats_hold_the_same_rows(tmp_path: Path) -> None:
    kw = {"rows": 1_500, "files": 2, "seed": 5, "slice_rows": 400, "bad_values": 0.01}
    csv_gz = read_trips(generate(tmp_path / "gz", **kw))
    plain = read_trips(generate(tmp_path / "csv", fmt="csv", **kw))
    assert plain.equals(csv_gz)
    parquet = pa.concat_tables(pq.read_table(p) for p in generate(tmp_path / "pq", fmt="parquet", **kw)[:2])
    jsonl = [
        json.loads(line)
        for p in generate(tmp_path / "js", fmt="jsonl.gz", **kw)[:2]
        for line in gzip.decompress(p.read_bytes()).decode().splitlines()
    ]
    assert parquet.column_names == list(COLUMNS) == list(jsonl[0])
    assert parquet["trip_id"].to_pylist() == [r["trip_id"] for r in jsonl] == list(range(1, 1_501))
    assert [r["pickup_at"] for r in jsonl] == csv_gz["pickup_at"].to_pylist()
    assert parquet["fare_amount"].to_pylist() == [r["fare_amount"] for r in jsonl]
    assert [r["notes"] for r in jsonl] == csv_gz["notes"].to_pylist()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"fmt": "xlsx"}, "fmt"),
        ({"files": 0}, "files"),
        ({"rows": -1}, "rows"),
        ({"bad_values": 1.5}, "bad_values"),
        ({"slice_rows": 0}, "slice_rows"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(tmp_path: Path, kwargs: dict[str, object], key: str) -> None:
    args: dict = {"rows": 10, "files": 1, **kwargs}
    with pytest.raises(ConfigError) as e:
        generate(tmp_path, **args)
    assert e.value.item == key
    assert repr(kwargs[key]) in str(e.value)
    assert not any(tmp_path.iterdir())

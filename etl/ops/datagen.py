"""Deterministic synthetic taxi-trips dataset, for examples, tests and benchmarks.

In: an output folder, a row count, a file count, a seed and a format.
Out: ``trips-000.<ext>`` … ``trips-NNN.<ext>`` (rows split as evenly as possible, ids
contiguous across files) plus ``zones.csv`` (zone_id, borough, zone_name), a lookup table
for ``pickup_zone``/``dropoff_zone``. The same arguments give byte-identical files (with
the same numpy: it does not promise the same random streams across versions).

Columns are shaped like NYC TLC trip records: trip_id, vendor_id, pickup_at, dropoff_at
(``YYYY-MM-DD HH:MM:SS`` over ``MONTHS`` months from ``FIRST_DAY``), passenger_count,
trip_distance, pickup_zone, dropoff_zone, payment_type, fare_amount, tip_amount,
total_amount, store_and_fwd (``Y``/``N``) and notes (mostly empty free text).

``messy=True`` adds what real exports carry and a job has to clean: empty values, spaces
around numbers, refunds (negative fares), zero-distance trips, ids missing from the zone
table, and notes with quoted commas, quotes and embedded newlines. Every value still
casts. ``bad_values`` (default 0) adds values that cannot be cast at all (``n/a``
fares, ``unknown`` passenger counts), for testing ``transform.on_error``.

Memory stays bounded: each file is generated and written in slices of ``SLICE_ROWS``
rows, and at most ``workers`` files are in progress at once.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from etl.core import durable
from etl.core.errors import ConfigError

FORMATS = ("csv", "csv.gz", "jsonl", "jsonl.gz", "parquet")

# Rows built and written at once. Measured: 100k rows run as fast as 500k and peak at
# ~120 MB per file in progress instead of ~330 MB; much smaller slices add per-call overhead.
SLICE_ROWS = 100_000
# zlib level 1 compresses ~4x faster than level 6 (measured ~95 vs ~24 MB/s of CSV) for
# files ~20% larger; Arrow's own gzip stream is fixed at level 9 (~9 MB/s).
GZIP_LEVEL = 1
# Files generated at once: zlib, the CSV writer and most numpy calls release the GIL, so
# threads use the cores; each one holds a slice in memory.
DEFAULT_WORKERS = 2

FIRST_DAY = np.datetime64("2024-01-01T00:00:00", "s")
MONTHS = 6  # pickups spread over 2024-01 .. 2024-06, so a month partition gives six folders
ZONE_COUNT = 263  # zone ids 1..263, like the TLC zone table
UNKNOWN_ZONE = ZONE_COUNT + 1  # an id the zone table does not have: a lookup finds no match

# Shares of rows touched by each messy feature (each drawn independently per row and column).
EMPTY_SHARE = 0.01  # empty cell, per column in EMPTY_COLUMNS
WHITESPACE_SHARE = 0.02  # spaces around the number, per column in WHITESPACE_COLUMNS
NEGATIVE_FARE_SHARE = 0.005  # refunds: fare, tip and total negated
ZERO_DISTANCE_SHARE = 0.01  # trip_distance 0 (cancelled or meter error)
UNKNOWN_ZONE_SHARE = 0.002  # pickup_zone not in zones.csv
NOTE_SHARE = 0.03  # notes filled in (always, messy or not); the rest are empty
EMPTY_COLUMNS = (
    "passenger_count",
    "trip_distance",
    "dropoff_at",
    "dropoff_zone",
    "payment_type",
    "tip_amount",
    "store_and_fwd",
)
WHITESPACE_COLUMNS = ("trip_distance", "fare_amount", "total_amount")
# With bad_values > 0, this share of each column below holds a value no cast accepts.
BAD_VALUES = {"fare_amount": "n/a", "passenger_count": "unknown"}

COLUMNS = (
    "trip_id",
    "vendor_id",
    "pickup_at",
    "dropoff_at",
    "passenger_count",
    "trip_distance",
    "pickup_zone",
    "dropoff_zone",
    "payment_type",
    "fare_amount",
    "tip_amount",
    "total_amount",
    "store_and_fwd",
    "notes",
)

PAYMENT_TYPES = ("card", "cash", "no charge", "dispute", "unknown")
PAYMENT_P = (0.72, 0.24, 0.02, 0.01, 0.01)
VENDORS = (1, 2, 6)
VENDOR_P = (0.3, 0.68, 0.02)
PASSENGER_P = (0.71, 0.14, 0.05, 0.03, 0.04, 0.03)  # 1..6 passengers
PLAIN_NOTES = (
    "airport run",
    "regular customer",
    "luggage in trunk",
    "child seat",
    "rain delay",
    "wheelchair access",
    "paid toll",
    "detour for roadworks",
)
MESSY_NOTES = (
    "left bag, driver called back",
    'said "step on it"',
    "two stops, one wait",
    "line one\nline two",
    'complaint: "AC broken",\nrefund asked',
)

BOROUGHS = {"EWR": 1, "Queens": 69, "Bronx": 43, "Manhattan": 69, "Staten Island": 20, "Brooklyn": 61}
_NAME_HEADS = (
    "Astoria",
    "Bay",
    "Cedar",
    "Clinton",
    "Crown",
    "East",
    "Forest",
    "Fort",
    "Garden",
    "Glen",
    "Harbor",
    "Hudson",
    "Jackson",
    "Kings",
    "Lake",
    "Lincoln",
    "Madison",
    "Maple",
    "Mill",
    "Morris",
    "Ocean",
    "Pelham",
    "River",
    "Rock",
    "Spring",
    "Union",
    "West",
    "Willow",
)
_NAME_TAILS = (
    "Heights",
    "Park",
    "Village",
    "Gardens",
    "Square",
    "Point",
    "Hill",
    "Beach",
    "Terrace",
    "Yards",
    "Flats",
    "North",
    "South",
    "Hill/Annex",
)


def generate(
    out_dir: Path,
    *,
    rows: int,
    files: int,
    seed: int = 0,
    fmt: str = "csv.gz",
    messy: bool = True,
    bad_values: float = 0.0,
    slice_rows: int = SLICE_ROWS,
    workers: int = DEFAULT_WORKERS,
) -> list[Path]:
    """Write the trips files and ``zones.csv`` into ``out_dir``; return their paths.

    Raises ``ConfigError`` naming the argument for a bad count, share or format.
    """
    _check_args(rows=rows, files=files, fmt=fmt, bad_values=bad_values, slice_rows=slice_rows, workers=workers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = [rows // files + (1 if i < rows % files else 0) for i in range(files)]
    first_ids = np.cumsum([1, *per_file[:-1]]).tolist()

    def one(i: int) -> Path:
        path = out_dir / f"trips-{i:03d}.{fmt}"
        tables = _slices(seed, i, first_ids[i], per_file[i], slice_rows, messy, bad_values)
        _write_atomic(path, fmt, tables)
        return path

    with ThreadPoolExecutor(min(workers, files), thread_name_prefix="datagen") as pool:
        paths = list(pool.map(one, range(files)))
    zones = out_dir / "zones.csv"
    _write_atomic(zones, "csv", iter([zones_table()]))
    return [*paths, zones]


def _check_args(**args: int | float | str) -> None:
    rules: dict[str, tuple[Callable[[object], bool], str]] = {
        "rows": (lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0"),
        "files": (lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
        "fmt": (lambda v: v in FORMATS, f"must be one of {', '.join(FORMATS)}"),
        "bad_values": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "must be a share in [0, 1]"),
        "slice_rows": (lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
        "workers": (lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    }
    for name, value in args.items():
        ok, rule = rules[name]
        if not ok(value):
            raise ConfigError(f"{name} {rule}, got {value!r}", key=name)


# ------------------------------------------------------------------------- trips


def _slices(
    seed: int,
    file_index: int,
    first_id: int,
    rows: int,
    slice_rows: int,
    messy: bool,
    bad_values: float,
) -> Iterator[pa.Table]:
    """The file's rows as tables of at most ``slice_rows``; one empty table for 0 rows."""
    starts = range(0, rows, slice_rows) if rows else [0]
    for k, start in enumerate(starts):
        # A seed per (seed, file, slice): files are independent, so they can be built in
        # any order or in parallel and still come out identical.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(file_index, k)))
        yield trips_table(rng, first_id + start, min(slice_rows, rows - start), messy, bad_values)


def trips_table(
    rng: np.random.Generator, first_id: int, n: int, messy: bool = True, bad_values: float = 0.0
) -> pa.Table:
    """``n`` trips with ids from ``first_id``; columns in ``COLUMNS`` order."""
    v = _trip_values(rng, n, messy)
    notes = PLAIN_NOTES + MESSY_NOTES if messy else PLAIN_NOTES
    note_idx = rng.integers(0, len(notes), n)
    cols: dict[str, pa.Array] = {
        "trip_id": pa.array(np.arange(first_id, first_id + n, dtype="int64")),
        "vendor_id": pa.array(np.asarray(VENDORS, "int8")[_draw(rng, n, VENDOR_P)]),
        "pickup_at": pa.array(v["pickup"].astype("datetime64[s]")),
        "dropoff_at": pa.array(v["dropoff"].astype("datetime64[s]")),
        "passenger_count": pa.array(_draw(rng, n, PASSENGER_P).astype("int8") + 1),
        "trip_distance": pa.array(v["distance"]),
        "pickup_zone": pa.array(v["pickup_zone"].astype("int16")),
        "dropoff_zone": pa.array(v["dropoff_zone"].astype("int16")),
        "payment_type": _texts(PAYMENT_TYPES, v["payment"]),
        "fare_amount": pa.array(v["fare"]),
        "tip_amount": pa.array(v["tip"]),
        "total_amount": pa.array(v["total"]),
        "store_and_fwd": _texts(("N", "Y"), (rng.random(n) < 0.01).astype("int8")),
        "notes": _texts(notes, note_idx, empty=rng.random(n) >= NOTE_SHARE),
    }
    if messy:
        _add_mess(rng, cols, n)
    if bad_values > 0:
        for name, bad in BAD_VALUES.items():
            hit = pa.array(rng.random(n) < bad_values)
            cols[name] = pc.if_else(hit, bad, pc.cast(cols[name], pa.string()))
    return pa.table(cols)


def _trip_values(rng: np.random.Generator, n: int, messy: bool) -> dict[str, np.ndarray]:
    """The numbers behind a trip, consistent with each other (fare follows distance and time)."""
    span = int((FIRST_DAY.astype("datetime64[M]") + MONTHS - FIRST_DAY).astype("int64"))
    pickup = FIRST_DAY.astype("int64") + rng.integers(0, span, n)
    minutes = np.clip(rng.lognormal(np.log(12.0), 0.6, n), 1.0, 180.0)
    distance = np.round(minutes / 60 * rng.uniform(6.0, 25.0, n), 2)  # 6-25 mph
    payment = _draw(rng, n, PAYMENT_P)
    fare = np.round(3.0 + 2.5 * distance + 0.5 * minutes, 2)
    tip = np.where(payment == 0, np.round(fare * rng.uniform(0.0, 0.3, n), 2), 0.0)
    zone_p = _zone_weights()
    pickup_zone = rng.choice(ZONE_COUNT, n, p=zone_p) + 1
    if messy:
        distance[rng.random(n) < ZERO_DISTANCE_SHARE] = 0.0
        refund = rng.random(n) < NEGATIVE_FARE_SHARE
        fare[refund], tip[refund] = -fare[refund], -tip[refund]
        pickup_zone[rng.random(n) < UNKNOWN_ZONE_SHARE] = UNKNOWN_ZONE
    return {
        "pickup": pickup,
        "dropoff": pickup + (minutes * 60).astype("int64"),
        "distance": distance,
        "payment": payment,
        "fare": fare,
        "tip": tip,
        "total": np.round(fare + tip + np.copysign(1.5, fare), 2),  # surcharges follow the sign
        "pickup_zone": pickup_zone,
        "dropoff_zone": rng.choice(ZONE_COUNT, n, p=zone_p) + 1,
    }


def _draw(rng: np.random.Generator, n: int, p: tuple[float, ...]) -> np.ndarray:
    return rng.choice(len(p), n, p=p)


def _texts(values: tuple[str, ...], idx: np.ndarray, empty: np.ndarray | None = None) -> pa.Array:
    """``values[idx]`` as an Arrow string array (null where ``empty``), without Python strings."""
    return pa.array(values, pa.string()).take(pa.array(idx, mask=empty))


def _add_mess(rng: np.random.Generator, cols: dict[str, pa.Array], n: int) -> None:
    for name in WHITESPACE_COLUMNS:
        text = pc.cast(cols[name], pa.string())
        padded = pc.binary_join_element_wise(" ", text, "  ", "")
        cols[name] = pc.if_else(pa.array(rng.random(n) < WHITESPACE_SHARE), padded, text)
    for name in EMPTY_COLUMNS:
        empty = pa.array(rng.random(n) < EMPTY_SHARE)
        cols[name] = pc.if_else(empty, pa.scalar(None, cols[name].type), cols[name])


def _zone_weights() -> np.ndarray:
    """A few busy zones and a long tail (like Midtown vs. the outer boroughs); fixed."""
    rank = np.random.default_rng(263).permutation(ZONE_COUNT) + 1
    w = 1.0 / rank**0.9
    weights: np.ndarray = w / w.sum()
    return weights


def zones_table() -> pa.Table:
    """The zone lookup table: ``ZONE_COUNT`` zones with unique names; the same for every seed."""
    rng = np.random.default_rng(ZONE_COUNT)
    names = [f"{h} {t}" for h in _NAME_HEADS for t in _NAME_TAILS]
    picked = rng.permutation(len(names))[:ZONE_COUNT]
    boroughs = [b for b, count in BOROUGHS.items() for _ in range(count)]
    return pa.table(
        {
            "zone_id": pa.array(np.arange(1, ZONE_COUNT + 1, dtype="int16")),
            "borough": pa.array(boroughs),
            "zone_name": pa.array([names[i] for i in picked]),
        }
    )


# ------------------------------------------------------------------------ writing


def _write_atomic(path: Path, fmt: str, tables: Iterator[pa.Table]) -> None:
    """Write beside the target and rename, so an interrupted run leaves no half file."""
    with durable.replacing(path) as raw:
        if fmt == "parquet":
            _write_parquet(raw, tables)
        else:
            with _maybe_gzip(raw, fmt.endswith(".gz")) as out:
                write = _write_csv if fmt.startswith("csv") else _write_jsonl
                write(out, tables)


class _GzipSink:
    """A write-only gzip stream with a chosen level (Arrow's gzip stream is fixed at 9)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        # wbits 31: gzip framing; zlib writes mtime 0, so the bytes depend only on the data.
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)

    def write(self, data: bytes | memoryview) -> None:
        self._raw.write(self._z.compress(data))

    def close(self) -> None:
        self._raw.write(self._z.flush())


@contextmanager
def _maybe_gzip(raw: IO[bytes], gzip: bool) -> Iterator[IO[bytes] | _GzipSink]:
    if not gzip:
        yield raw
        return
    sink = _GzipSink(raw)
    yield sink
    sink.close()


def _write_csv(out: IO[bytes] | _GzipSink, tables: Iterator[pa.Table]) -> None:
    header = True
    for table in tables:
        buf = pa.BufferOutputStream()
        pa_csv.write_csv(table, buf, pa_csv.WriteOptions(include_header=header))
        out.write(memoryview(buf.getvalue()))
        header = False


def _write_jsonl(out: IO[bytes] | _GzipSink, tables: Iterator[pa.Table]) -> None:
    # Timestamps as the same text the CSV holds; JSONL is for small test files, so the
    # row-by-row json.dumps is fast enough.
    for table in tables:
        for name in ("pickup_at", "dropoff_at"):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pc.cast(table[name], pa.string()))
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist())
        out.write(lines.encode())


def _write_parquet(sink: IO[bytes], tables: Iterator[pa.Table]) -> None:
    first = next(tables)
    with pq.ParquetWriter(sink, first.schema, compression="zstd") as writer:
        writer.write_table(first)
        for table in tables:
            writer.write_table(table)

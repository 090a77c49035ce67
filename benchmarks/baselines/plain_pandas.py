"""Baseline: the benchmark job as a plain single-process pandas script.

    python benchmarks/baselines/plain_pandas.py --out DIR --zones zones.csv URL [URL ...]

One file at a time: ``pd.read_csv`` straight from the URL (pandas fetches it with urllib
and gunzips it), transform, append to a hive-partitioned Parquet dataset. This is what
most people write first; ``transform``/``write`` are shared with ``by_hand_pool.py`` so the
two do exactly the same work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = [
    "trip_id",
    "pickup_at",
    "dropoff_at",
    "passenger_count",
    "trip_distance",
    "pickup_zone",
    "payment_type",
    "fare_amount",
    "tip_amount",
    "total_amount",
]
DTYPES = {
    "trip_id": "int64",
    "passenger_count": "float64",
    "trip_distance": "float64",
    "pickup_zone": "int64",
    "fare_amount": "float64",
    "tip_amount": "float64",
    "total_amount": "float64",
    "payment_type": "str",
    "pickup_at": "str",
    "dropoff_at": "str",
}
TS_FORMAT = "%Y-%m-%d %H:%M:%S"


def read(src: str) -> pd.DataFrame:
    """A URL or a local path; ``.gz`` is decompressed (pandas infers it from the name)."""
    return pd.read_csv(src, usecols=COLUMNS, dtype=DTYPES, keep_default_na=False, na_values=[""])


def transform(df: pd.DataFrame, zones: pd.DataFrame) -> pd.DataFrame:
    df = df[COLUMNS]
    df["pickup_at"] = pd.to_datetime(df["pickup_at"], format=TS_FORMAT)
    df["dropoff_at"] = pd.to_datetime(df["dropoff_at"], format=TS_FORMAT)
    df = df.fillna({"tip_amount": 0.0, "passenger_count": 1.0, "payment_type": "unknown"})
    df["passenger_count"] = df["passenger_count"].astype("int64")
    # NaN and NaT compare False, so missing distances and drop-offs drop out, like SQL nulls.
    df = df[(df["fare_amount"] >= 0) & (df["trip_distance"] > 0) & (df["dropoff_at"] > df["pickup_at"])]
    fare = df["fare_amount"]
    df = df.assign(
        duration_min=(df["dropoff_at"] - df["pickup_at"]).dt.total_seconds() / 60,
        tip_ratio=np.where(fare > 0, df["tip_amount"] / fare.where(fare > 0, 1.0), 0.0),
        month=df["pickup_at"].dt.strftime("%Y-%m"),
    )
    out = df.merge(zones, how="left", left_on="pickup_zone", right_on="zone_id")
    return out.drop(columns="zone_id")


def read_zones(path: str) -> pd.DataFrame:
    return pd.read_csv(path, usecols=["zone_id", "borough", "zone_name"], dtype={"zone_id": "int64"})


def write(df: pd.DataFrame, out: Path, tag: str) -> None:
    """Append this frame's rows to ``out/month=YYYY-MM/<tag>-0.parquet`` (zstd)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_to_dataset(
        table, out, partition_cols=["month"], compression="zstd", basename_template=f"{tag}-{{i}}.parquet"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zones", required=True)
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    zones = read_zones(args.zones)
    for i, url in enumerate(args.urls):
        write(transform(read(url), zones), args.out, f"part-{i:05d}")


if __name__ == "__main__":
    main()

"""Baseline: the benchmark job as a Dask dataframe on a local 2-worker cluster.

    python benchmarks/baselines/dask_df.py --out DIR --zones zones.csv [--workers 2] URL [URL ...]

``dd.read_csv`` reads the URLs itself (fsspec's HTTP filesystem, in the workers); gzip
cannot be split, so each file is one partition. The steps are the same pandas operations
as ``plain_pandas.py`` written against the Dask API; the zone table is a small pandas
frame, so the merge is a broadcast join. ``to_parquet(partition_on=["month"])`` writes
the hive-partitioned output from the workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask.dataframe as dd
from dask.distributed import Client, LocalCluster
from plain_pandas import COLUMNS, DTYPES, TS_FORMAT, read_zones


def build(urls: list[str], zones_path: str) -> dd.DataFrame:
    df = dd.read_csv(
        urls, blocksize=None, compression="gzip", usecols=COLUMNS, dtype=DTYPES, keep_default_na=False, na_values=[""]
    )
    # Dask infers the output schema from a sample; pin the integer keys so the merge
    # below joins int64 with int64 (it warned and upcast to float64 otherwise).
    df = df[COLUMNS].astype({"trip_id": "int64", "pickup_zone": "int64"})
    df["pickup_at"] = dd.to_datetime(df["pickup_at"], format=TS_FORMAT)
    df["dropoff_at"] = dd.to_datetime(df["dropoff_at"], format=TS_FORMAT)
    df = df.fillna({"tip_amount": 0.0, "passenger_count": 1.0, "payment_type": "unknown"})
    df["passenger_count"] = df["passenger_count"].astype("int64")
    df = df[(df["fare_amount"] >= 0) & (df["trip_distance"] > 0) & (df["dropoff_at"] > df["pickup_at"])]
    fare = df["fare_amount"]
    df = df.assign(
        duration_min=(df["dropoff_at"] - df["pickup_at"]).dt.total_seconds() / 60,
        tip_ratio=(df["tip_amount"] / fare.where(fare > 0, 1.0)).where(fare > 0, 0.0),
        month=df["pickup_at"].dt.strftime("%Y-%m"),
    )
    zones = read_zones(zones_path)
    out = df.merge(zones, how="left", left_on="pickup_zone", right_on="zone_id")
    return out.drop(columns="zone_id")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zones", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    # One thread per worker process: the pandas work holds the GIL, so more threads per
    # worker would only contend; processes give the parallelism.
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        build(args.urls, args.zones).to_parquet(
            str(args.out), partition_on=["month"], compression="zstd", write_index=False
        )


if __name__ == "__main__":
    main()

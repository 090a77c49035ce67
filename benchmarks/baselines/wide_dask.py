"""Baseline: the wide benchmark job (``jobs/wide.toml``) as a Dask dataframe on a local cluster.

    python benchmarks/baselines/wide_dask.py --out DIR --lookup stores.csv [--workers 2] URL [URL ...]

As ``dask_df.py``: ``dd.read_csv`` reads the URLs in the workers (one partition per
gzipped file), the steps are ``wide_pandas.py``'s written against the Dask API, the store
table is a small pandas frame (a broadcast join), ``to_parquet(partition_on=["month"])``
writes from the workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask.dataframe as dd
from dask.distributed import Client, LocalCluster
from wide_pandas import CREATED_FORMAT, DTYPES, SHIPPED_FORMAT, read_stores


def build(urls: list[str], lookup: str) -> dd.DataFrame:
    df = dd.read_csv(urls, blocksize=None, compression="gzip", dtype=DTYPES, keep_default_na=False, na_values=[""])
    df = df.astype({"order_id": "int64", "customer_id": "int64", "store_id": "int64"})
    df["created_at"] = dd.to_datetime(df["created_at"], format=CREATED_FORMAT)
    df["shipped_at"] = dd.to_datetime(df["shipped_at"], format=SHIPPED_FORMAT)
    df = df.fillna({"quantity": 1.0, "discount": 0.0})
    df["quantity"] = df["quantity"].astype("int64")
    df = df[(df["unit_price"] > 0) & (df["shipped_at"] >= df["created_at"])]
    df = df.assign(
        net_amount=df["quantity"] * df["unit_price"] * (1 - df["discount"]),
        ship_hours=(df["shipped_at"] - df["created_at"]).dt.total_seconds() / 3600,
        month=df["created_at"].dt.strftime("%Y-%m"),
    )
    df["tax_amount"] = df["net_amount"] * df["tax_rate"]
    return df.merge(read_stores(lookup), how="left", on="store_id").drop(columns="channel")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lookup", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        build(args.urls, args.lookup).to_parquet(
            str(args.out), partition_on=["month"], compression="zstd", write_index=False
        )


if __name__ == "__main__":
    main()

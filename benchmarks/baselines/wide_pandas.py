"""Baseline: the wide benchmark job (``jobs/wide.toml``) as a plain single-process pandas script.

    python benchmarks/baselines/wide_pandas.py --out DIR --lookup stores.csv URL [URL ...]

One file at a time: ``pd.read_csv`` straight from the URL (pandas fetches and gunzips it)
with the job's casts as dtypes, transform, append to a hive-partitioned Parquet dataset
(``plain_pandas.write``: zstd, ``month=YYYY-MM/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from plain_pandas import write

DTYPES = {
    "order_id": "int64",
    "created_at": "str",
    "shipped_at": "str",
    "customer_id": "int64",
    "store_id": "int64",
    "sku": "str",
    "quantity": "float64",
    "unit_price": "float64",
    "discount": "float64",
    "tax_rate": "float64",
    "channel": "str",
    "comment": "str",
}
CREATED_FORMAT, SHIPPED_FORMAT = "%Y-%m-%d %H:%M:%S", "%d/%m/%Y %H:%M"


def read(src: str) -> pd.DataFrame:
    return pd.read_csv(src, dtype=DTYPES, keep_default_na=False, na_values=[""])


def read_stores(path: str) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"store_id": "int64", "region": "str", "store_name": "str"})


def transform(df: pd.DataFrame, stores: pd.DataFrame) -> pd.DataFrame:
    df["created_at"] = pd.to_datetime(df["created_at"], format=CREATED_FORMAT)
    df["shipped_at"] = pd.to_datetime(df["shipped_at"], format=SHIPPED_FORMAT)
    df = df.fillna({"quantity": 1.0, "discount": 0.0})
    df["quantity"] = df["quantity"].astype("int64")
    # NaT compares False, so unshipped orders drop out, like SQL nulls.
    df = df[(df["unit_price"] > 0) & (df["shipped_at"] >= df["created_at"])]
    df = df.assign(
        net_amount=df["quantity"] * df["unit_price"] * (1 - df["discount"]),
        ship_hours=(df["shipped_at"] - df["created_at"]).dt.total_seconds() / 3600,
        month=df["created_at"].dt.strftime("%Y-%m"),
    )
    df["tax_amount"] = df["net_amount"] * df["tax_rate"]
    return df.merge(stores, how="left", on="store_id").drop(columns="channel")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lookup", required=True)
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    stores = read_stores(args.lookup)
    for i, url in enumerate(args.urls):
        write(transform(read(url), stores), args.out, f"part-{i:05d}")


if __name__ == "__main__":
    main()

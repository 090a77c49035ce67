"""Baseline: the wide benchmark job (``jobs/wide.toml``) as a lazy Polars query.

    python benchmarks/baselines/wide_polars.py --out DIR --lookup stores.csv URL [URL ...]

The files are downloaded first (threads, into a temp folder, inside the measured wall
time, as for DuckDB), then ``pl.scan_csv`` reads the gzipped copies with every column as
text (``infer_schema=False``: the casts are the job's, as in the other engines), the
query is planned lazily and collected once, and ``write_parquet(partition_by="month")``
writes zstd hive folders.
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
from duckdb_sql import DOWNLOAD_THREADS, _download


def build(files: list[str], lookup: str) -> pl.LazyFrame:
    raw = pl.scan_csv(files, infer_schema=False)
    num = lambda name, t: pl.col(name).str.strip_chars().cast(t)  # noqa: E731 - text is trimmed, as the tool does
    df = raw.select(
        num("order_id", pl.Int64),
        pl.col("created_at").str.to_datetime("%Y-%m-%d %H:%M:%S", time_unit="us"),
        pl.col("shipped_at").str.to_datetime("%d/%m/%Y %H:%M", time_unit="us"),
        num("customer_id", pl.Int64),
        num("store_id", pl.Int64),
        pl.col("sku"),
        num("quantity", pl.Float64).fill_null(1.0).cast(pl.Int64),
        num("unit_price", pl.Float64),
        num("discount", pl.Float64).fill_null(0.0),
        num("tax_rate", pl.Float64),
        pl.col("comment"),
    )
    df = df.filter((pl.col("unit_price") > 0) & (pl.col("shipped_at") >= pl.col("created_at")))
    df = df.with_columns(
        net_amount=pl.col("quantity") * pl.col("unit_price") * (1 - pl.col("discount")),
        ship_hours=(pl.col("shipped_at") - pl.col("created_at")).dt.total_seconds() / 3600,
        month=pl.col("created_at").dt.strftime("%Y-%m"),
    ).with_columns(tax_amount=pl.col("net_amount") * pl.col("tax_rate"))
    stores = pl.scan_csv(lookup, schema_overrides={"store_id": pl.Int64})
    return df.join(stores, on="store_id", how="left")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lookup", required=True)
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            files = list(pool.map(lambda u: _download(u, tmp), args.urls))
        table = build(files, args.lookup).collect()
    args.out.mkdir(parents=True, exist_ok=True)
    table.write_parquet(args.out, compression="zstd", partition_by="month")


if __name__ == "__main__":
    main()

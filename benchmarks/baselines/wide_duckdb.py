"""Baseline: the wide benchmark job (``jobs/wide.toml``) as one DuckDB SQL statement.

    python benchmarks/baselines/wide_duckdb.py --out DIR --lookup stores.csv [--threads N] URL [URL ...]

As ``duckdb_sql.py``: the files are downloaded first (threads, into a temp folder, inside
the measured wall time; DuckDB's ``httpfs`` needs a network download of its own), read
as text and cast explicitly, the store table is a LEFT JOIN, and ``COPY ... TO`` writes
zstd Parquet partitioned by month.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
from duckdb_sql import DOWNLOAD_THREADS, _download

QUERY = """
COPY (
  WITH raw AS (
    SELECT * FROM read_csv($files, header = true, all_varchar = true, quote = '"',
                           escape = '"', nullstr = '')
  ), typed AS (
    SELECT CAST(order_id AS BIGINT) AS order_id,
           strptime(created_at, '%Y-%m-%d %H:%M:%S') AS created_at,
           strptime(shipped_at, '%d/%m/%Y %H:%M') AS shipped_at,
           CAST(customer_id AS BIGINT) AS customer_id,
           CAST(store_id AS BIGINT) AS store_id,
           sku,
           CAST(COALESCE(CAST(quantity AS DOUBLE), 1.0) AS BIGINT) AS quantity,
           CAST(unit_price AS DOUBLE) AS unit_price,
           COALESCE(CAST(discount AS DOUBLE), 0.0) AS discount,
           CAST(tax_rate AS DOUBLE) AS tax_rate,
           comment
    FROM raw
  ), derived AS (
    SELECT *,
           quantity * unit_price * (1 - discount) AS net_amount,
           date_diff('second', created_at, shipped_at) / 3600.0 AS ship_hours,
           strftime(created_at, '%Y-%m') AS month
    FROM typed
    WHERE unit_price > 0 AND shipped_at >= created_at
  )
  SELECT d.*, d.net_amount * d.tax_rate AS tax_amount, s.region, s.store_name
  FROM derived d
  LEFT JOIN read_csv($lookup, header = true) s ON d.store_id = s.store_id
) TO '{out}' (FORMAT parquet, PARTITION_BY (month), COMPRESSION zstd)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lookup", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            files = list(pool.map(lambda u: _download(u, tmp), args.urls))
        con = duckdb.connect(config={"threads": args.threads})
        out = str(args.out).replace("'", "''")
        con.execute(QUERY.format(out=out), {"files": files, "lookup": args.lookup})


if __name__ == "__main__":
    main()

"""Baseline: the benchmark job as one DuckDB SQL statement.

    python benchmarks/baselines/duckdb_sql.py --out DIR --zones zones.csv [--threads N] URL [URL ...]

DuckDB reads http(s) only through its ``httpfs`` extension, which it downloads on first
use; this machine is offline, so the script fetches the files itself first (threads, into
a temp folder; that time is part of the measured wall time, as every engine's download
is) and DuckDB reads the local copies. Columns are read as text and cast explicitly, so
the typing rules match the other engines; the zone table is a LEFT JOIN; ``COPY ... TO``
writes zstd Parquet partitioned by month.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb

DOWNLOAD_THREADS = 4  # localhost downloads: a few connections saturate the disk

QUERY = """
COPY (
  WITH raw AS (
    SELECT * FROM read_csv($files, header = true, all_varchar = true, quote = '"',
                           escape = '"', nullstr = '')
  ), typed AS (
    SELECT CAST(trip_id AS BIGINT) AS trip_id,
           strptime(pickup_at, '%Y-%m-%d %H:%M:%S') AS pickup_at,
           strptime(dropoff_at, '%Y-%m-%d %H:%M:%S') AS dropoff_at,
           CAST(COALESCE(CAST(passenger_count AS DOUBLE), 1.0) AS BIGINT) AS passenger_count,
           CAST(trip_distance AS DOUBLE) AS trip_distance,
           CAST(pickup_zone AS BIGINT) AS pickup_zone,
           COALESCE(payment_type, 'unknown') AS payment_type,
           CAST(fare_amount AS DOUBLE) AS fare_amount,
           COALESCE(CAST(tip_amount AS DOUBLE), 0.0) AS tip_amount,
           CAST(total_amount AS DOUBLE) AS total_amount
    FROM raw
  )
  SELECT t.*,
         date_diff('second', t.pickup_at, t.dropoff_at) / 60.0 AS duration_min,
         CASE WHEN t.fare_amount > 0 THEN t.tip_amount / t.fare_amount ELSE 0.0 END AS tip_ratio,
         strftime(t.pickup_at, '%Y-%m') AS month,
         z.borough, z.zone_name
  FROM typed t
  LEFT JOIN read_csv($zones, header = true) z ON t.pickup_zone = z.zone_id
  WHERE t.fare_amount >= 0 AND t.trip_distance > 0 AND t.dropoff_at > t.pickup_at
) TO '{out}' (FORMAT parquet, PARTITION_BY (month), COMPRESSION zstd)
"""


def _download(url: str, folder: str) -> str:
    path = os.path.join(folder, url.rsplit("/", 1)[-1])
    with urllib.request.urlopen(url) as resp, open(path, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zones", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            files = list(pool.map(lambda u: _download(u, tmp), args.urls))
        con = duckdb.connect(config={"threads": args.threads})
        out = str(args.out).replace("'", "''")
        con.execute(QUERY.format(out=out), {"files": files, "zones": args.zones})


if __name__ == "__main__":
    main()

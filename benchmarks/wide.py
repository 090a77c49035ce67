"""The second benchmark job (issue #15): retail orders, wider and messier than the taxi trips.

``generate(folder, rows, files)`` writes ``orders-000.csv.gz`` … and ``stores.csv``
(deterministic: the same arguments give the same bytes, with the same numpy), and
``check_output(out)`` gives the figures every engine's Parquet output must agree on. The
job itself is ``jobs/wide.toml``; the baselines doing the same work are
``baselines/wide_*.py``.

Twelve columns, chosen to be unlike the taxi job where it matters for CPU per row:

    order_id     int, contiguous              cast int64
    created_at   2024-03-07 13:45:10          parse_datetime "%Y-%m-%d %H:%M:%S"
    shipped_at   09/03/2024 08:12             parse_datetime "%d/%m/%Y %H:%M" (1% empty)
    customer_id  int up to 5 M                cast int64
    store_id     1..265, 0.3% 999 (no match)  cast int64, lookup in stores.csv
    sku          SKU-01234                    text, kept
    quantity     1..12, 1% empty              cast float64, fillna 1, cast int64
    unit_price   0.99..499.99, 2% padded with spaces, 0.5% negative (returns)
    discount     0..0.30, 40% empty           cast float64, fillna 0
    tax_rate     0, 0.05, 0.07, 0.2           cast float64
    channel      web/store/phone/app          dropped
    comment      10% filled: quoted commas, doubled quotes, the odd newline

Every text value is quoted by the CSV writer (pyarrow quotes string columns), so the
numbers padded with spaces travel quoted, as many real exports do.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl.ops.datagen import _texts, _write_atomic

SLICE_ROWS = 100_000  # rows built at once (as etl.ops.datagen: ~100 MB per file in progress)
GEN_THREADS = 2  # files built at once: zlib and most Arrow kernels release the GIL
FIRST_DAY = np.datetime64("2024-01-01T00:00:00", "s")
MONTHS = 6
STORES = 265  # like the 265-row lookup table
UNKNOWN_STORE = 999
CHANNELS = ("web", "store", "phone", "app")
CHANNEL_P = (0.55, 0.3, 0.05, 0.1)
TAX_RATES = ("0", "0.05", "0.07", "0.2")
COMMENTS = (
    "leave at door",
    "gift wrap, no invoice",
    'customer said "urgent"',
    'size "L", colour "navy, dark"',
    "call before delivery",
    "second attempt\nbuzzer broken",
    "fragile",
    'note: "handle with care", thanks',
)
REGIONS = ("North", "South", "East", "West", "Central")
EMPTY_SHIPPED, EMPTY_QUANTITY, EMPTY_DISCOUNT = 0.01, 0.01, 0.40
PADDED_PRICE, RETURNS, UNKNOWN_STORE_SHARE, COMMENT_SHARE = 0.02, 0.005, 0.003, 0.10


def orders_table(rng: np.random.Generator, first_id: int, n: int) -> pa.Table:
    """``n`` orders with ids from ``first_id``, columns in the order above."""
    span = int((FIRST_DAY.astype("datetime64[M]") + MONTHS - FIRST_DAY).astype("int64"))
    created = FIRST_DAY.astype("int64") + rng.integers(0, span, n)
    shipped = created + (rng.gamma(2.0, 18.0, n) * 3600).astype("int64")
    shipped_text = pc.strftime(pa.array(shipped.astype("datetime64[s]")), format="%d/%m/%Y %H:%M")
    price = np.round(rng.lognormal(np.log(25.0), 1.0, n).clip(0.99, 499.99), 2)
    price[rng.random(n) < RETURNS] *= -1
    price_text = pc.cast(pa.array(price), pa.string())
    padded = pc.binary_join_element_wise(" ", price_text, "  ", "")
    store = rng.integers(1, STORES + 1, n)
    store[rng.random(n) < UNKNOWN_STORE_SHARE] = UNKNOWN_STORE
    sku = pc.binary_join_element_wise(
        "SKU-", pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, 20_000, n)), pa.string()), 5, "0"), ""
    )
    return pa.table(
        {
            "order_id": pa.array(np.arange(first_id, first_id + n, dtype="int64")),
            "created_at": pa.array(created.astype("datetime64[s]")),
            "shipped_at": pc.if_else(
                pa.array(rng.random(n) < EMPTY_SHIPPED), pa.scalar(None, pa.string()), shipped_text
            ),
            "customer_id": pa.array(rng.integers(1, 5_000_000, n)),
            "store_id": pa.array(store),
            "sku": sku,
            "quantity": pa.array(rng.integers(1, 13, n), mask=rng.random(n) < EMPTY_QUANTITY),
            "unit_price": pc.if_else(pa.array(rng.random(n) < PADDED_PRICE), padded, price_text),
            "discount": pa.array(np.round(rng.uniform(0, 0.3, n), 2), mask=rng.random(n) < EMPTY_DISCOUNT),
            "tax_rate": _texts(TAX_RATES, rng.integers(0, len(TAX_RATES), n)),
            "channel": _texts(CHANNELS, rng.choice(len(CHANNELS), n, p=CHANNEL_P)),
            "comment": _texts(COMMENTS, rng.integers(0, len(COMMENTS), n), empty=rng.random(n) >= COMMENT_SHARE),
        }
    )


def stores_table() -> pa.Table:
    rng = np.random.default_rng(STORES)
    return pa.table(
        {
            "store_id": pa.array(np.arange(1, STORES + 1, dtype="int64")),
            "region": _texts(REGIONS, rng.integers(0, len(REGIONS), STORES)),
            "store_name": pa.array([f"Store {i:03d}" for i in range(1, STORES + 1)]),
        }
    )


def generate(folder: Path, rows: int, files: int, seed: int = 15) -> None:
    """``orders-NNN.csv.gz`` and ``stores.csv`` (written last: its presence means done)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = [rows // files + (1 if i < rows % files else 0) for i in range(files)]
    first_ids = np.cumsum([1, *per_file[:-1]]).tolist()

    def one(i: int) -> None:
        starts = range(0, per_file[i], SLICE_ROWS)
        tables = (
            orders_table(
                np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, k))),
                first_ids[i] + start,
                min(SLICE_ROWS, per_file[i] - start),
            )
            for k, start in enumerate(starts)
        )
        _write_atomic(folder / f"orders-{i:03d}.csv.gz", "csv.gz", tables)

    with ThreadPoolExecutor(GEN_THREADS) as pool:
        list(pool.map(one, range(files)))
    _write_atomic(folder / "stores.csv", "csv", iter([stores_table()]))


def dataset(data_dir: Path, rows: int, files: int) -> Path:
    """The generated orders for this size, made once (written aside, then renamed)."""
    folder = data_dir / f"wide-rows{rows}-files{files}"
    if (folder / "stores.csv").exists():
        return folder
    tmp = data_dir / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating {rows:,} orders in {files} files into {folder} ...", flush=True)
    started = time.perf_counter()
    generate(tmp, rows, files)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"  done in {time.perf_counter() - started:.1f}s", flush=True)
    return folder


def check_output(out: Path) -> dict[str, float | int]:
    """Rows, sums and counts every engine must agree on, read back from its Parquet."""
    rows = nulls = 0
    net = tax = hours = 0.0
    files = sorted(out.rglob("*.parquet"))
    months = {p.parent.name for p in files}
    for path in files:
        t = pq.read_table(path, columns=["net_amount", "tax_amount", "ship_hours", "region"])
        rows += t.num_rows
        net += pc.sum(t["net_amount"]).as_py() or 0.0
        tax += pc.sum(t["tax_amount"]).as_py() or 0.0
        hours += pc.sum(t["ship_hours"]).as_py() or 0.0
        nulls += t["region"].null_count
    return {
        "rows": rows,
        "net_sum": round(net, 4),
        "tax_sum": round(tax, 4),
        "ship_hours_sum": round(hours, 4),
        "unmatched_store": nulls,
        "months": len(months),
    }

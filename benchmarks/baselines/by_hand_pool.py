"""Baseline: the benchmark job the way the usual advice says to parallelise it.

    python benchmarks/baselines/by_hand_pool.py --out DIR --zones zones.csv URL [URL ...]

Threads download (I/O-bound, the GIL is released while waiting on sockets) into a temp
folder; as each file lands, a ``multiprocessing.Pool`` with one process per core
transforms it (one file per task) and writes its own Parquet parts. Same pandas code as
``plain_pandas.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
from plain_pandas import read, read_zones, transform, write

DOWNLOAD_THREADS = 4  # localhost downloads: a few connections saturate the disk

_ZONES: pd.DataFrame | None = None


def _init(zones_path: str) -> None:
    global _ZONES
    _ZONES = read_zones(zones_path)


def _one_file(path: str, out: str, tag: str) -> int:
    assert _ZONES is not None
    df = transform(read(path), _ZONES)
    write(df, Path(out), tag)
    os.unlink(path)  # the staged copy is no longer needed
    return len(df)


def _download(url: str, folder: str) -> str:
    path = os.path.join(folder, url.rsplit("/", 1)[-1])
    with urllib.request.urlopen(url) as resp, open(path, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zones", required=True)
    p.add_argument("urls", nargs="+")
    args = p.parse_args()
    tags = {url: f"part-{i:05d}" for i, url in enumerate(args.urls)}
    with (
        tempfile.TemporaryDirectory() as tmp,
        multiprocessing.Pool(os.cpu_count(), _init, (args.zones,)) as pool,
        ThreadPoolExecutor(DOWNLOAD_THREADS) as threads,
    ):
        futures = {threads.submit(_download, url, tmp): url for url in args.urls}
        pending = []
        for fut in as_completed(futures):
            url = futures[fut]
            pending.append(pool.apply_async(_one_file, (fut.result(), str(args.out), tags[url])))
        for res in pending:
            res.get()


if __name__ == "__main__":
    main()

"""Shared fixtures: small messy CSV sources and a job-file writer."""

from __future__ import annotations

import csv
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def nginx_binary() -> str | None:
    """Debian's nginx, or None. CI sets ``ETL_REQUIRE_NGINX=1``: there a missing nginx fails
    the suite instead of quietly skipping the tests that need a production server."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None and os.environ.get("ETL_REQUIRE_NGINX") == "1":
        pytest.fail("ETL_REQUIRE_NGINX=1 but nginx is not installed (apt-get install nginx-light)", pytrace=False)
    return found


PAYMENTS = ["card", "cash", "Card ", "", "voucher"]


def write_trips_csv(path: Path, rows: int, seed: int, start_id: int = 0) -> None:
    """Messy trips: quoted commas, embedded newlines, empty fields, padded numbers."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["trip_id", "pickup_at", "dropoff_at", "passengers", "distance", "fare", "tip", "zone", "payment", "note"]
        )
        for i in range(start_id, start_id + rows):
            month = rng.choice([1, 2, 3])
            day, hour, minute = rng.randint(1, 28), rng.randint(0, 22), rng.randint(0, 59)
            pickup = f"2026-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:00"
            dropoff = f"2026-{month:02d}-{day:02d} {hour + 1:02d}:{rng.randint(0, 59):02d}:30"
            passengers = rng.choice(["1", "2", " 3 ", "", "4"])
            fare = rng.choice([f"{rng.uniform(-5, 80):.2f}", f" {rng.uniform(1, 50):.2f}", ""])
            tip = rng.choice([f"{rng.uniform(0, 10):.2f}", ""])
            note = rng.choice(["", "plain", "with, comma", 'quote "inside"', "two\nlines", "Ünïcode"])
            w.writerow(
                [
                    i,
                    pickup,
                    dropoff,
                    passengers,
                    f"{rng.uniform(0, 30):.3f}",
                    fare,
                    tip,
                    rng.randint(1, 6),
                    rng.choice(PAYMENTS),
                    note,
                ]
            )


def write_zones(path: Path) -> None:
    path.write_text("zone_id,borough\n1,Manhattan\n2,Queens\n3,Brooklyn\n4,Bronx\n5,Staten Island\n")


@pytest.fixture
def trips_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for k in range(3):
        write_trips_csv(d / f"trips-{k}.csv", rows=400 + 37 * k, seed=k, start_id=10_000 * k)
    write_zones(d / "zones.csv")
    return d


JobWriter = Callable[..., Path]


@pytest.fixture
def write_job(tmp_path: Path) -> JobWriter:
    def write(body: str, name: str = "job.toml") -> Path:
        p = tmp_path / name
        p.write_text(body)
        return p

    return write

"""The engines the transform benchmark compares, and the check that they all agree.

Each engine is a command line (a real standalone program run as a subprocess) that reads
the served files over HTTP and writes hive-partitioned Parquet (``month=YYYY-MM/``) into
an output folder. ``check_output`` reads that folder back and gives the figures every
engine must agree on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
JOB = HERE / "jobs" / "transform.toml"
REL_TOL = 1e-9  # float sums differ in the last bits with the summation order of each engine


@dataclass(frozen=True)
class Engine:
    name: str
    kind: str  # "etl" (this tool, with overrides) or a baseline script's file name
    overrides: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # importable modules it needs (optional extras)
    root: Path | None = None  # run this tool from another working copy (A/B of a change)

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.needs)


@dataclass(frozen=True)
class Job:
    """One benchmark job: its job file, its data's file names and how its output is checked."""

    name: str
    toml: Path
    prefix: str  # data files are <prefix>-000.csv.gz, <prefix>-001.csv.gz, ...
    lookup: str  # the lookup table's file name in the data folder (read locally by every engine)
    lookup_flag: str  # the baselines' option naming it
    check: Callable[[Path], dict[str, float | int]]


def _check_wide(out: Path) -> dict[str, float | int]:
    from benchmarks.wide import check_output as wide_check

    return wide_check(out)


def jobs() -> dict[str, Job]:
    """``taxi``: the README's benchmark (issue #4); ``wide``: the second job (issue #15, ``wide.py``)."""
    return {
        "taxi": Job("taxi", JOB, "trips", "zones.csv", "--zones", check_output),
        "wide": Job("wide", HERE / "jobs" / "wide.toml", "orders", "stores.csv", "--lookup", _check_wide),
    }


def engines(workers: int, job: str = "taxi") -> list[Engine]:
    """Every engine, in the order of the table; ``workers`` is the pool size for all."""
    w = f"transform.workers={workers}"
    if job == "wide":  # default settings only: the job file sets no executor, workers or tuning
        return [
            Engine("etl process (defaults)", "etl"),
            Engine("plain pandas", "wide_pandas.py"),
            Engine(f"dask ({workers} workers)", "wide_dask.py", needs=("dask", "distributed")),
            Engine("duckdb", "wide_duckdb.py", needs=("duckdb",)),
            Engine("polars (lazy)", "wide_polars.py", needs=("polars",)),
        ]
    return [
        Engine("etl process (defaults)", "etl"),  # issue #15: no --set (the README's settings are --set)
        Engine(f"etl process ({workers} workers)", "etl", ('transform.executor="process"', w)),
        Engine("etl process (1 worker)", "etl", ('transform.executor="process"', "transform.workers=1")),
        Engine(f"etl thread ({workers} workers)", "etl", ('transform.executor="thread"', w)),
        Engine("etl serial", "etl", ('transform.executor="serial"',)),
        Engine("plain pandas", "plain_pandas.py"),
        Engine(f"by-hand Pool ({workers} procs)", "by_hand_pool.py"),
        Engine(f"dask ({workers} workers)", "dask_df.py", needs=("dask", "distributed")),
        Engine("duckdb", "duckdb_sql.py", needs=("duckdb",)),
    ]


@dataclass
class Paths:
    data: Path  # the generated dataset (zones.csv is read locally by every engine)
    base_url: str
    files: int
    out: Path
    state: Path
    extra_overrides: list[str] = field(default_factory=list)
    job: Job | None = None  # None: the taxi job

    @property
    def the_job(self) -> Job:
        return self.job or jobs()["taxi"]

    def urls(self) -> list[str]:
        return [f"{self.base_url}/{self.the_job.prefix}-{i:03d}.csv.gz" for i in range(self.files)]


def command(engine: Engine, paths: Paths, workers: int) -> tuple[list[str], dict[str, str]]:
    """The argv and the extra environment variables for one run of ``engine``."""
    if engine.kind == "etl":
        env = {
            "BENCH_STATE": str(paths.state),
            "BENCH_OUT": str(paths.out),
            "BENCH_DATA": str(paths.data),
            "BENCH_URLS": f"{paths.base_url}/{paths.the_job.prefix}-{{000..{paths.files - 1:03d}}}.csv.gz",
        }
        run_py = (engine.root or HERE.parent) / "run.py"
        argv = [sys.executable, str(run_py), "--config", str(paths.the_job.toml), "--full-refresh", "--quiet"]
        for o in (*engine.overrides, *paths.extra_overrides):
            argv += ["--set", o]
        return argv, env
    argv = [
        sys.executable,
        str(HERE / "baselines" / engine.kind),
        "--out",
        str(paths.out),
        paths.the_job.lookup_flag,
        str(paths.data / paths.the_job.lookup),
    ]
    if engine.kind in ("dask_df.py", "wide_dask.py"):
        argv += ["--workers", str(workers)]
    return argv + paths.urls(), {}


def etl_report(state: Path) -> dict[str, object]:
    """Stage timings from this tool's run report (the newest one in the state folder)."""
    reports = sorted(state.glob("*/reports/run-*.json"))
    if not reports:
        return {}
    s = json.loads(reports[-1].read_text())["summary"]
    chunks_q = next((q for q in s["queues"] if q["name"] == "chunks"), {})
    return {
        "stage_seconds": s["stage_seconds"],
        "worker_seconds": round(s["transform"]["worker_seconds"], 2),
        "chunks": s["chunks"],
        "transform_starved_s": round(chunks_q.get("get_wait_s", 0.0), 2),
        "first_chunk_s": chunks_q.get("first_put_s"),
        "read_blocked_s": round(chunks_q.get("put_blocked_s", 0.0), 2),
    }


# ------------------------------------------------------------------------- checking


def check_output(out: Path) -> dict[str, float | int]:
    """Rows, sums and counts every engine must agree on, read back from its Parquet."""
    rows = nulls = 0
    fare = duration = 0.0
    files = sorted(out.rglob("*.parquet"))
    months = {p.parent.name for p in files}
    for path in files:
        t = pq.read_table(path, columns=["fare_amount", "duration_min", "borough"])
        rows += t.num_rows
        fare += pc.sum(t["fare_amount"]).as_py() or 0.0
        duration += pc.sum(t["duration_min"]).as_py() or 0.0
        nulls += t["borough"].null_count
    return {
        "rows": rows,
        "fare_sum": round(fare, 4),
        "duration_sum": round(duration, 4),
        "unmatched_zone": nulls,
        "months": len(months),
    }


def differences(got: dict[str, float | int], want: dict[str, float | int]) -> list[str]:
    """What differs between two ``check_output`` results (empty when they agree)."""
    out = []
    for key, w in want.items():
        g = got.get(key)
        same = math.isclose(g, w, rel_tol=REL_TOL) if isinstance(w, float) and g is not None else g == w
        if not same:
            out.append(f"{key} {g} != {w}")
    return out

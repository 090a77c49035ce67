"""The measuring half of ``run.py bench``: points, their runs, and what a run measured.

A point is a set of ``--set`` overrides (``Point``); ``Bench`` runs points and keeps every
run's metrics per point (``PointResult``: medians, spread, the most frequent bottleneck).
The grid (``measure_grid``) and the ``--auto`` search (etl/ops/bench_search.py) both run
through ``Bench.run_once``; the table, files and command are in etl/ops/bench.py.

Each run is a separate ``python run.py run --quiet`` process, so its peak RSS and CPU are
its own (the run measures its own process tree, see etl/core/stats.py), with its own output
folder and state folder under ``<out>/runs/``. One unmeasured warm-up run comes first: it
fills the download cache (``<out>/cache``) and the OS page cache, so the first point is
not penalised. Without ``--include-download`` every run starts from a copy of the cache's
staged files and conditional-GET state (hard links), so remote sources answer 304 and are
not fetched again, while the run's manifest, reports and output stay its own.

A grid runs in rounds: every point once, then every point again, ``--repeat`` times, so a
slow spell on a shared machine is spread over all points.

The memory budget: every run's report says whether its plan fits the budget and how long
the memory guard held chunks back (the bottleneck is ``memory`` when that was 10% of the
run or more, see etl/core/stats.py); ``Bench.budget_plan`` asks the planner about a point
before it runs, and ``limit_for`` names a ``resources.memory_limit`` under which it fits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from etl.core.config import load_job
from etl.core.errors import ConfigError, ETLError, ExitCode
from etl.core.machine import machine
from etl.core.stats import STAGES
from etl.run.resources import PLAN_SHARE, Probe, ResourcePlan, memory_budget, plan_for

ROOT = Path(__file__).resolve().parents[2]  # etl/ops/bench_runs.py -> the clone (run.py)
MEMORY_STEP = 256 << 20  # a suggested memory_limit is rounded up to this: finer is false precision
STOP_GRACE_S = 30.0  # after Ctrl-C, how long a run may take to stop before it is killed
OK_CODES = (ExitCode.OK, ExitCode.REJECTED_ROWS)


Point = dict[str, str]
PointKey = tuple[tuple[str, str], ...]


def point_key(point: Point) -> PointKey:
    """A point as a dict key: its settings, in key order."""
    return tuple(sorted(point.items()))


@dataclass
class PointResult:
    point: Point
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return cast(float, statistics.median(r[key] for r in self.runs))

    def spread(self, key: str) -> tuple[float, float]:
        values = [r[key] for r in self.runs]
        return min(values), max(values)

    @property
    def throughput(self) -> float:
        return self.median("rows_per_s")

    @property
    def bottleneck(self) -> str:
        return cast(str, Counter(r["bottleneck"] for r in self.runs).most_common(1)[0][0])

    @property
    def fits(self) -> bool:
        """The runs' plans fit the memory budget (the planner's worst case is under it)."""
        return all(r.get("plan", {}).get("fits", True) for r in self.runs)

    @property
    def held_back(self) -> float:
        """Median seconds the memory guard held chunks back."""
        return statistics.median(float(r.get("held_back_s", 0.0)) for r in self.runs)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.point.items()) or "(job as is)"

    def stage_seconds(self) -> dict[str, dict[str, float]]:
        """Mean busy / wait / blocked seconds per stage over the runs."""
        return {
            s: {k: statistics.fmean(r["stages"][s][k] for r in self.runs) for k in ("busy_s", "wait_s", "blocked_s")}
            for s in STAGES
            if all(s in r["stages"] for r in self.runs)
        }

    def stage_slots(self) -> dict[str, int]:
        """Slots per stage (threads or workers), as the last run had them."""
        stages = self.runs[-1]["stages"] if self.runs else {}
        return {s: int(stages[s].get("slots", 1)) for s in STAGES if s in stages}

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = dict(self.point)
        row["runs"] = len(self.runs)
        for key in ("wall_s", "rows_per_s", "mib_per_s"):
            lo, hi = self.spread(key)
            row[f"{key}_median"], row[f"{key}_min"], row[f"{key}_max"] = (
                round(self.median(key), 3),
                round(lo, 3),
                round(hi, 3),
            )
        row["peak_rss_mib"] = round(self.median("peak_rss_mib"), 1)
        row["cpu_util"] = round(self.median("cpu_util"), 3)
        row["bottleneck"] = self.bottleneck
        row["fits_budget"] = self.fits
        row["held_back_s"] = round(self.held_back, 3)
        return row


class Interrupted(Exception):
    """Ctrl-C during a run: stop measuring, keep what was measured."""


# --------------------------------------------------------------------------- grid


def parse_vary(items: list[str]) -> dict[str, list[str]]:
    """``["transform.workers=1,2,4"]`` → ``{"transform.workers": ["1", "2", "4"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"--vary expects key.path=v1,v2,..., got {item!r}")
        out[key.strip()] = vals
    return out


def grid(vary: dict[str, list[str]]) -> list[Point]:
    keys = list(vary)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vary[k] for k in keys))]


def overrides(point: Point) -> list[str]:
    return [f"{k}={v}" for k, v in point.items()]


def set_line(point: Point) -> str:
    return " ".join(f"--set {k}={v}" for k, v in point.items())


def value_order(v: str) -> tuple[int, float | str]:
    """A setting's value as a sort key: numbers by value, before other values by text."""
    try:
        return (0, float(v))
    except ValueError:
        return (1, v)


# -------------------------------------------------------------------------- runner


class Bench:
    def __init__(self, config: Path, base: list[str], out: Path, repeat: int, include_download: bool) -> None:
        self.config, self.base, self.out = config.resolve(), base, out.resolve()
        self.repeat, self.include_download = repeat, include_download
        self.cfg = load_job(self.config, base)
        self.results: dict[PointKey, PointResult] = {}
        self.runs_done = 0
        self.plain: dict[str, Any] = {}  # the plan of the warm-up run: what a plain run chooses
        self._plans: dict[PointKey, ResourcePlan | None] = {}
        self._last_plan: dict[str, Any] = {}
        self.auto_hint: dict[str, Any] = {}  # after --auto: when more memory helps, the point and why

    def check(self, points: list[Point]) -> None:
        """Every point must be a valid job before anything runs (a typo fails in a second)."""
        for p in points:
            load_job(self.config, self.base + overrides(p))

    def warm_up(self) -> None:
        """One plain run (the job and the base overrides only): the cache, and the plan it chose."""
        print(f"warm-up run (not measured) in {self.out / 'cache'}", flush=True)
        self._run({}, self.out / "cache", keep_staging=True)
        self.plain = self._last_plan

    def budget_plan(self, point: Point) -> ResourcePlan | None:
        """The planner's verdict on ``point`` (its keys as explicit settings), on the chunk the
        warm-up run measured; None before a warm-up (or when it measured nothing)."""
        if not self.plain.get("probe"):
            return None
        key = point_key(point)
        if key not in self._plans:
            try:
                cfg = load_job(self.config, self.base + overrides(point))
            except ETLError:
                self._plans[key] = None
                return None
            executor = self.plain.get("executor", cfg.transform.executor)
            cfg = cfg.model_copy(update={"transform": cfg.transform.model_copy(update={"executor": executor})})
            box = machine()
            budget = memory_budget(cfg.resources.memory_limit, box.memory, box.cpus)
            self._plans[key] = plan_for(cfg, box, budget, Probe(**self.plain["probe"]))
        return self._plans[key]

    def fits(self, point: Point) -> bool:
        """Whether ``point``'s settings fit the memory budget (True when it cannot be told)."""
        plan = self.budget_plan(point)
        return plan is None or plan.fits

    def measure_grid(self, points: list[Point]) -> None:
        """Every point ``repeat`` times, in rounds (each point once, then again): a slow spell
        on a shared machine lands on every point instead of on the few it happens to overlap."""
        total = len(points) * self.repeat
        for rnd in range(1, self.repeat + 1):
            for p in points:
                run = self.run_once(p)
                print(
                    f"[{self.runs_done}/{total}] {PointResult(p).label()}: {run['wall_s']:.2f}s, "
                    f"{run['rows_per_s']:,.0f} rows/s, {run['mib_per_s']:.1f} MiB/s, peak RSS "
                    f"{run['peak_rss_mib']:,.0f} MiB, CPU {run['cpu_util']:.0%}, bottleneck {run['bottleneck']} "
                    f"(round {rnd}/{self.repeat})",
                    flush=True,
                )

    def run_once(self, point: Point) -> dict[str, Any]:
        """One more run of ``point``, added to its result."""
        result = self.results.setdefault(point_key(point), PointResult(point))
        run = self._run(point, self.out / "runs" / f"r{self.runs_done + 1:03d}", keep_staging=False)
        result.runs.append(run)
        self.runs_done += 1
        return run

    def _run(self, point: Point, folder: Path, keep_staging: bool) -> dict[str, Any]:
        shutil.rmtree(folder, ignore_errors=True)
        state = folder / "state"
        job_state = state / self.cfg.job.name
        if not self.include_download and not keep_staging:
            seed_cache(self.out / "cache" / "state" / self.cfg.job.name, job_state)
        where = [f"job.state_dir={json.dumps(str(state))}", f"output.path={json.dumps(str(folder / 'output'))}"]
        cmd = [
            sys.executable,
            str(ROOT / "run.py"),
            "run",
            "--config",
            str(self.config),
            "--quiet",
            "--log-level",
            "WARNING",
            "--log-file",
            str(folder / "run.log"),
        ]
        for item in self.base + overrides(point) + where:
            cmd += ["--set", item]
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # Its own session: the terminal's Ctrl-C reaches bench only, which passes on one SIGINT
        # (two would count as "stop now" and kill the run instead of stopping it cleanly).
        code = _wait(
            subprocess.Popen(cmd, cwd=str(self.config.parent), stdin=subprocess.DEVNULL, start_new_session=True)
        )
        elapsed = time.perf_counter() - started
        if code not in OK_CODES:
            log = (folder / "run.log").read_text(errors="replace")[-2000:] if (folder / "run.log").exists() else ""
            raise ETLError(
                f"bench run for {set_line(point) or 'the job as is'} exited with code {code} "
                f"(log: {folder / 'run.log'}):\n{log}"
            )
        report = _report(job_state)
        self._last_plan = report.get("summary", {}).get("plan") or {}
        shutil.rmtree(folder / "output", ignore_errors=True)  # bounded disk: the numbers are in the report
        if not keep_staging:
            shutil.rmtree(job_state / "staging", ignore_errors=True)
        return metrics(report, elapsed)


def _wait(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # the run stops cleanly: workers stopped, temp output gone
        try:
            proc.wait(STOP_GRACE_S)  # the run's own job.stop_grace_seconds kills it sooner if stuck
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise Interrupted() from None


def seed_cache(cache: Path, job_state: Path) -> None:
    """Give a run the cache's staged files and conditional-GET state, nothing else (no manifest)."""
    staging = job_state / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    if (cache / "sources.json").exists():
        shutil.copy2(cache / "sources.json", job_state / "sources.json")
    for f in (cache / "staging").glob("*") if (cache / "staging").is_dir() else []:
        if f.is_file() and not f.name.endswith((".part", ".part.json")):
            try:
                os.link(f, staging / f.name)
            except OSError:
                shutil.copy2(f, staging / f.name)  # another filesystem: copy instead


def _report(job_state: Path) -> dict[str, Any]:
    reports = sorted((job_state / "reports").glob("run-*.json"))
    if not reports:
        raise ETLError(f"bench: the run left no report in {job_state / 'reports'}")
    return cast("dict[str, Any]", json.loads(reports[-1].read_text()))


def metrics(report: dict[str, Any], process_wall: float) -> dict[str, Any]:
    s = report["summary"]
    st = s.get("stats", {})
    plan = s.get("plan") or {}
    wall = max(float(s["wall_seconds"]), 1e-9)
    return {
        "wall_s": wall,
        "process_wall_s": round(process_wall, 3),
        "rows_in": s["rows_in"],
        "rows_per_s": s["rows_in"] / wall,
        "mib_per_s": s["bytes_read"] / wall / 2**20,
        "peak_rss_mib": st.get("peak_rss_bytes", 0) / 2**20,
        "cpu_util": st.get("cpu_util", 0.0),
        "cpu_seconds": st.get("cpu_seconds", 0.0),
        "bottleneck": st.get("bottleneck", {}).get("stage", "?"),
        "stages": st.get("stages", {}),
        "exit_code": report.get("exit_code"),
        "held_back_s": float((s.get("memory") or {}).get("paused_seconds", 0.0)),
        "plan": {
            k: plan[k] for k in ("executor", "workers", "chunk_rows", "budget", "estimated_peak", "fits") if k in plan
        },
    }


def limit_for(peak: int, budget: int = 0) -> str:
    """A ``resources.memory_limit`` under which a plan with this worst case fits (and above ``budget``)."""
    need = max(math.ceil(peak / PLAN_SHARE), budget + 1)
    mib = math.ceil(need / MEMORY_STEP) * MEMORY_STEP >> 20
    return f"{mib >> 10}GiB" if mib % 1024 == 0 else f"{mib}MiB"

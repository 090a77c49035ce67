"""``python run.py bench``: run a job over a grid of settings (or search them) and compare.

Each run is a separate ``python run.py run --quiet`` process, so its peak RSS and CPU are
its own (the run measures its own process tree, see etl/stats.py), with its own output
folder and state folder under ``<out>/runs/``. One unmeasured warm-up run comes first: it
fills the download cache (``<out>/cache``) and the OS page cache, so the first point is
not penalised. Without ``--include-download`` every run starts from a copy of the cache's
staged files and conditional-GET state (hard links), so remote sources answer 304 and are
not fetched again, while the run's manifest, reports and output stay its own.

A grid runs in rounds: every point once, then every point again, ``--repeat`` times, so a
slow spell on a shared machine is spread over all points. Per point: median and spread
(min-max) of wall time, rows/s, MiB/s; median peak RSS, CPU use; the most frequent
bottleneck. Writes ``bench.csv``, ``bench.json`` and PNG plots to the
output folder, also after Ctrl-C (with the points measured so far).

``--auto`` is a coordinate search driven by the measured bottleneck (see ``auto_search``),
starting from what a plain run does (the planner's workers and chunk rows, read from the
warm-up run's report): keys whose stage is not the bottleneck are skipped, the others are
stepped along their ladders while a step gains at least ``AUTO_MIN_GAIN``, each step judged
by runs of the candidate and the incumbent side by side, so drift between minutes cancels
out; a step whose settings do not fit the memory budget is judged with the other keys
re-planned to fit, and a small pattern of diagonal steps around the result catches a point
that is fast only in combination.

The memory budget: every run's report says whether its plan fits the budget and how long
the memory guard held chunks back (the bottleneck is ``memory`` when that was 10% of the
run or more, see etl/core/stats.py); the table flags points whose settings do not fit, and
when more memory is what helps, the recommendation says so with a
``--set resources.memory_limit=…`` line.
"""

from __future__ import annotations

import csv
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from etl.core.config import JobConfig, load_job
from etl.core.errors import ConfigError, ETLError, ExitCode
from etl.core.machine import machine, usable_cpus
from etl.core.stats import STAGES
from etl.run.resources import PLAN_SHARE, Probe, ResourcePlan, gib, memory_budget, plan_for

ROOT = Path(__file__).resolve().parents[2]  # etl/ops/bench.py -> the clone (run.py)
AUTO_MIN_GAIN = 0.05  # a step must gain this much throughput to be taken: less is noise here
AUTO_DECISIVE = 0.10  # one side-by-side pair this far from the gain line decides a step alone: not noise
AUTO_STEP_RUNGS = 2  # a step looks this many rungs ahead: more finds gains spread over rungs, costs runs
AUTO_MAX_PASSES = 3  # passes over the keys; each pass starts from the newest bottleneck
AUTO_RUN_SHARE = 1 / 3  # passes after the first, the diagonal pattern and the memory check stop at this
# share of the grid's runs (the ladders' product x --repeat): more explores further, costs runs
MEMORY_STEP = 256 << 20  # a suggested memory_limit is rounded up to this: finer is false precision
STOP_GRACE_S = 30.0  # after Ctrl-C, how long a run may take to stop before it is killed
OK_CODES = (ExitCode.OK, ExitCode.REJECTED_ROWS)
STAGE_OF_SECTION = {
    "sources": "download",
    "download": "download",
    "read": "read",
    "transform": "transform",
    "output": "write",
}
# Settings that speed up more than their own section's stage, main stage first: the chunk
# size sets how many chunks every later stage handles (per-chunk overhead, part files); it,
# the worker count and the chunks in flight set the memory a run needs ("memory": the
# bottleneck when the memory guard held chunks back).
KEY_STAGES = {
    "read.chunk_rows": ("read", "transform", "write", "memory"),
    "transform.workers": ("transform", "memory"),
    "transform.in_flight": ("transform", "memory"),
}
PLANNED_KEYS = ("transform.workers", "read.chunk_rows")  # what the planner chooses when not set


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


# --------------------------------------------------------------------------- auto


def ladders(cfg: JobConfig, vary: dict[str, list[str]], plain: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Candidate values per searched key: the ``--vary`` lists, else ladders around the job's
    value; the default chunk ladder also holds the chunk size a plain run plans (``plain``)."""
    cores = usable_cpus()
    chunk_rows = {25_000, 50_000, 100_000, 200_000, 400_000, 800_000}
    if plain and plain.get("chunk_rows"):
        chunk_rows.add(int(plain["chunk_rows"]))
    out = {
        "transform.workers": sorted({1, 2, 4, cores, 2 * cores}),
        "read.chunk_rows": sorted(chunk_rows),
        "download.concurrency": [1, 2, 4, 8, 16],
    }
    if cfg.transform.executor == "serial":
        del out["transform.workers"]  # one worker whatever the setting
    ladder = {k: [str(v) for v in vals] for k, vals in out.items()}
    ladder.update(vary)
    return ladder


def current_value(cfg: JobConfig, key: str, ladder: list[str]) -> str:
    """The job's own value for ``key`` if on the ladder, else the nearest rung."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    if node == "auto" and key == "transform.workers":
        node = usable_cpus()
    if str(node) in ladder:
        return str(node)
    try:
        return nearest(ladder, float(node))
    except (TypeError, ValueError):
        return ladder[0]


def nearest(ladder: list[str], value: float) -> str:
    """The rung nearest ``value`` on a log scale (ladders double), the lower one on a tie."""
    numeric = []
    for rung in ladder:
        try:
            numeric.append((abs(math.log(float(rung) / value)), float(rung), rung))
        except (ValueError, ZeroDivisionError):
            continue
    return min(numeric)[2] if numeric else ladder[0]


def start_point(bench: Bench, ladder: dict[str, list[str]]) -> Point:
    """What a plain run does: the planner's workers and chunk rows (the warm-up run's plan),
    the job's own value for every other key; each on the nearest rung of its ladder."""
    planned = {"transform.workers": bench.plain.get("workers"), "read.chunk_rows": bench.plain.get("chunk_rows")}
    point: Point = {}
    for key, rungs in ladder.items():
        value = planned.get(key)
        point[key] = nearest(rungs, float(value)) if value else current_value(bench.cfg, key, rungs)
    return point


def key_stages(key: str) -> tuple[str, ...]:
    """The stages a setting can speed up, its main one first; ``()`` if unknown (never skipped)."""
    if key in KEY_STAGES:
        return KEY_STAGES[key]
    stage = STAGE_OF_SECTION.get(key.partition(".")[0])
    return (stage,) if stage else ()


def key_order(keys: list[str], bottleneck: str) -> list[str]:
    """Keys whose main stage is the bottleneck first, then keys that also touch it, then the rest."""

    def rank(key: str) -> int:
        stages = key_stages(key)
        return 0 if stages[:1] == (bottleneck,) else 1 if bottleneck in stages else 2

    return sorted(keys, key=rank)  # stable: equal ranks keep the ladder's order


def limit_for(peak: int, budget: int = 0) -> str:
    """A ``resources.memory_limit`` under which a plan with this worst case fits (and above ``budget``)."""
    need = max(math.ceil(peak / PLAN_SHARE), budget + 1)
    mib = math.ceil(need / MEMORY_STEP) * MEMORY_STEP >> 20
    return f"{mib >> 10}GiB" if mib % 1024 == 0 else f"{mib}MiB"


def auto_search(bench: Bench, vary: dict[str, list[str]], log: Callable[[str], None] = print) -> PointResult:
    """Coordinate search from what a plain run does, led by the measured bottleneck.

    It starts from the warm-up run's plan (``start_point``: the planner's workers and chunk
    rows), not from the job file's defaults. Each pass orders the keys by the best point's
    bottleneck stage (``key_order``) and climbs them one at a time. A key is skipped when
    none of its stages (``key_stages``) is the bottleneck of the best point or of the last
    run: a faster download cannot help a transform-bound run; ``memory`` (the guard held
    chunks back) is a stage of the worker count and the chunk size. Climbing steps the key
    along its ladder while a step of one or two rungs (``AUTO_STEP_RUNGS``) gains at least
    ``AUTO_MIN_GAIN``; a key's first climb tries up, then down, and it goes on in the
    direction it moved until another key moves (then both directions are open again).

    Memory: a step whose settings do not fit the budget (``Bench.fits``: the planner's
    verdict on the chunk the warm-up measured) is judged with the other planned keys
    re-planned to fit (``_Search.replan``: the most workers, then the largest chunks, as the
    planner prefers), so a step never looks bad, nor a step back good, only because the
    memory guard throttled one side.

    A step is judged side by side (``_Search.gain``): runs alternate between the incumbent
    and the candidate (I C I C ...), and every three consecutive runs give one ratio, the
    candidate's geometric mean over the incumbent's (the middle run against the two around
    it); the gain is the median of those ratios (with ``--repeat 1``: one pair, I C). On a
    shared machine the same point drifts by more than 5% between minutes; runs seconds apart
    drift together, and a steady drift cancels exactly between the two outer runs. The
    chain opens with the incumbent's latest run when it was the last run made. One ratio
    far from the 5% line (``AUTO_DECISIVE``) decides alone; otherwise ratios stop once a
    majority of ``repeat`` fall on one side of it.

    When a pass moves nothing, a pattern around the incumbent is tried (``_Search.pattern``):
    two keys stepped one rung each, the diagonals whose single steps measured best first, so
    a point fast only in combination is found; a diagonal that gains starts new passes.
    Passes after the first, the pattern and the memory check stop once the search has used
    ``AUTO_RUN_SHARE`` of the grid's runs, and after ``AUTO_MAX_PASSES`` passes.
    """
    search = _Search(bench, ladders(bench.cfg, vary, bench.plain), log)
    best = start_point(bench, search.ladder)
    if not bench.fits(best):  # a rung above the planned chunk size: back under the budget
        best = search.replan(best, keep="transform.workers")
    planned = f"{bench.plain['workers']} workers, {bench.plain['chunk_rows']:,}-row chunks" if bench.plain else "?"
    log(f"auto: starting where a plain run plans ({planned}): {PointResult(best).label()}")
    search.run(best)
    for n in range(1, AUTO_MAX_PASSES + 1):
        search.capped = n > 1
        if n > 1 and search.spent():
            log(f"auto: pass {n}: not run, the search has used {bench.runs_done} of its {search.cap} runs")
            break
        start, climbed = best, []
        for key in key_order(list(search.ladder), search.result(best).bottleneck):
            hot = {search.result(best).bottleneck, search.last_bottleneck}
            stages = key_stages(key)
            if stages and "?" not in hot and not hot.intersection(stages):
                where = " and ".join(sorted(hot)) + (" (best point and last run)" if len(hot) > 1 else "")
                log(f"auto: pass {n}: skipped {key}: it speeds up {'/'.join(stages)}, the bottleneck is {where}")
                continue
            climbed.append(key)
            best = search.climb(best, key)
        if best == start:
            search.capped = True
            moved = search.pattern(best, climbed)
            if moved is None:
                break
            best = moved
    chosen = search.result(best)
    search.capped = True
    search.memory_hint(best)
    bench.auto_hint = search.hint
    log(
        f"auto: chose {chosen.label()} ({chosen.throughput:,.0f} rows/s, median of its {len(chosen.runs)} runs) "
        f"after {len(bench.results)} points, {bench.runs_done} runs"
    )
    return chosen


def _geomean(values: list[float]) -> float:
    return math.prod(values) ** (1 / len(values))


@dataclass
class _Search:
    bench: Bench
    ladder: dict[str, list[str]]
    log: Callable[[str], None]
    gains: dict[tuple[PointKey, PointKey], float] = field(default_factory=dict)  # (incumbent, candidate) -> ratio
    direction: dict[str, int] = field(default_factory=dict)  # key -> +1 / -1, the way it last moved
    last_point: PointKey = ()
    last_run: dict[str, Any] = field(default_factory=dict)
    over_budget: dict[PointKey, list[Point]] = field(default_factory=dict)  # incumbent -> steps that did not fit
    hint: dict[str, Any] = field(default_factory=dict)  # more memory helps: the point and why
    capped: bool = False  # past the first pass: comparisons stop at ``cap`` runs

    @property
    def cap(self) -> int:
        """Runs after which the optional work stops: ``AUTO_RUN_SHARE`` of the grid's runs."""
        return max(math.floor(math.prod(len(v) for v in self.ladder.values()) * self.bench.repeat * AUTO_RUN_SHARE), 1)

    def spent(self, best: Point | None = None) -> bool:
        """One more comparison with ``best`` (its fewest runs) would pass the cap."""
        width = 3 if self.bench.repeat > 1 else 2
        need = width - 1 + (0 if best is not None and self.last_point == point_key(best) else 1)
        return self.bench.runs_done + need > self.cap

    def run(self, point: Point) -> float:
        """One run of ``point``; its rows/s."""
        self.last_run, self.last_point = self.bench.run_once(point), point_key(point)
        return float(self.last_run["rows_per_s"])

    def result(self, point: Point) -> PointResult:
        return self.bench.results[point_key(point)]

    @property
    def last_bottleneck(self) -> str:
        return str(self.last_run.get("bottleneck", "?"))

    def known(self, best: Point, candidate: Point) -> float | None:
        """The ratio already measured for this pair, either way round."""
        a, b = point_key(best), point_key(candidate)
        if (a, b) in self.gains:
            return self.gains[(a, b)]
        return 1 / self.gains[(b, a)] if (b, a) in self.gains else None

    def gain(self, best: Point, candidate: Point) -> float:
        """The candidate's rows/s over the incumbent's, runs side by side (see auto_search)."""
        cached = self.known(best, candidate)
        if cached is not None:
            return cached
        if self.capped and self.spent(best):
            step = " ".join(k.split(".")[-1] + "=" + v for k, v in candidate.items() if best.get(k) != v)
            self.log(f"auto: {step} not tried: the search has used {self.bench.runs_done} of its {self.cap} runs")
            return 0.0
        ratios = self._side_by_side(best, candidate)
        gain = self.gains[(point_key(best), point_key(candidate))] = statistics.median(ratios)
        moved = [k.split(".")[-1] + "=" + v for k, v in candidate.items() if best.get(k) != v]
        verdict = "a step" if gain >= 1 + AUTO_MIN_GAIN else "under the line"
        self.log(
            f"auto: {' '.join(moved)} vs {self.result(best).label()}: {gain - 1:+.1%} side by side "
            f"({', '.join(f'{r - 1:+.1%}' for r in ratios)}): {verdict} [{self.bench.runs_done} runs]"
        )
        return gain

    def _side_by_side(self, best: Point, candidate: Point) -> list[float]:
        """Ratios of the candidate's rows/s to the incumbent's from alternating runs.

        The chain opens with the incumbent's run just before, if it was the last run made;
        every run from the ``width``-th on closes a window of the last ``width`` runs."""
        line, need = 1 + AUTO_MIN_GAIN, self.bench.repeat // 2 + 1
        width = 3 if self.bench.repeat > 1 else 2  # one run per point asked: plain pairs, fewest runs
        opening = float(self.last_run["rows_per_s"]) if self.last_point == point_key(best) else self.run(best)
        chain: list[tuple[bool, float]] = [(True, opening)]  # (is the incumbent, rows/s)
        ratios: list[float] = []
        while len(ratios) < self.bench.repeat:
            incumbent = not chain[-1][0]
            chain.append((incumbent, self.run(best if incumbent else candidate)))
            if len(chain) < width:
                continue
            window = chain[-width:]
            ratios.append(_geomean([v for inc, v in window if not inc]) / _geomean([v for inc, v in window if inc]))
            above = sum(r >= line for r in ratios)
            if (len(ratios) == 1 and abs(ratios[0] - line) >= AUTO_DECISIVE) or need in (above, len(ratios) - above):
                break
            if self.capped and self.bench.runs_done >= self.cap:
                break  # the run budget: decided on the ratios measured
        return ratios

    def fits(self, point: Point) -> bool:
        """The planner says ``point`` fits the budget, and its runs, if any, were not held back
        by the memory guard (bottleneck ``memory``: the estimate missed)."""
        measured = self.bench.results.get(point_key(point))
        if measured is not None and measured.runs and measured.bottleneck == "memory":
            return False
        return self.bench.fits(point)

    def replan(self, point: Point, keep: str) -> Point:
        """``point`` with the planned keys other than ``keep`` re-chosen as the planner would:
        the first rung, most workers then largest chunks, whose settings fit the budget
        (workers at most the usable CPUs, as the planner does); ``point`` if none fits."""
        others = [k for k in PLANNED_KEYS if k != keep and k in self.ladder]
        options: list[list[str]] = []
        for key in others:
            rungs = sorted(self.ladder[key], key=_sort_key, reverse=True)
            if key == "transform.workers":
                rungs = [r for r in rungs if _sort_key(r) <= (0, usable_cpus())] or rungs
            options.append(rungs)
        for values in itertools.product(*options):
            candidate = {**point, **dict(zip(others, values))}
            if self.fits(candidate):
                return candidate
        return point

    def candidate(self, best: Point, key: str, value: str) -> Point | None:
        """The point a step of ``key`` to ``value`` is judged at: re-planned when it does not fit."""
        step = {**best, key: value}
        if self.fits(step):
            return step
        self.over_budget.setdefault(point_key(best), []).append(step)
        fitted = self.replan(step, keep=key)
        if fitted == best or fitted == step:
            why = "it is the current point" if fitted == best else "nothing fits"
            self.log(f"auto: {key.split('.')[-1]}={value} does not fit the memory budget; re-planned: {why}")
            return None if fitted == best else step
        changed = " ".join(f"{k.split('.')[-1]}={v}" for k, v in fitted.items() if step[k] != v)
        self.log(f"auto: {key.split('.')[-1]}={value} does not fit the memory budget: judged re-planned, {changed}")
        return fitted

    def climb(self, best: Point, key: str) -> Point:
        """Step ``key`` while a step gains at least ``AUTO_MIN_GAIN``; the new best point.

        A step may be one or two rungs: doubling ladders (chunk rows 25k, 50k, 100k) often
        gain a few percent per rung, under the 5% line, and more over two. A step under the
        line is not taken even if it measured faster: differences that small are the noise
        here, and taking one would move the base the other keys are climbed from."""
        ladder = self.ladder[key]
        for step in [self.direction[key]] if key in self.direction else [+1, -1]:
            start = best
            while True:
                here = ladder.index(best[key])
                rungs = [here + step * n for n in range(1, AUTO_STEP_RUNGS + 1) if 0 <= here + step * n < len(ladder)]
                steps = [c for c in (self.candidate(best, key, ladder[i]) for i in rungs) if c is not None]
                taken = next(
                    (c for c in self._judged(best, key, steps) if self.gain(best, c) >= 1 + AUTO_MIN_GAIN), None
                )
                if taken is None:
                    break
                best = taken
            if best != start:
                # the other keys are re-tested both ways from here; this one too when a re-planned
                # step moved another key with it (that pair of changes hides the single steps)
                replanned = any(best[k] != start[k] for k in best if k != key)
                self.direction = {} if replanned else {key: step}
                return best
        return best

    def _judged(self, best: Point, key: str, steps: list[Point]) -> Iterator[Point]:
        """``steps`` in order, each followed by its re-planned form when its runs turn out held
        back by the memory guard (the planner thought it fit: the measurement wins)."""
        for step in steps:
            yield step
            if step != best and not self.fits(step):
                fitted = self.replan(step, keep=key)
                if fitted not in (step, best):
                    changed = " ".join(f"{k.split('.')[-1]}={v}" for k, v in fitted.items() if step[k] != v)
                    self.log(
                        f"auto: {PointResult(step).label()} was held back by the memory guard: re-planned, {changed}"
                    )
                    yield fitted

    def pattern(self, best: Point, keys: list[str]) -> Point | None:
        """Diagonal steps around ``best``: two of ``keys`` one rung each, those whose single
        steps measured best first (unmeasured counts as no change), while runs remain;
        the first that gains, or None."""
        diagonals: list[tuple[float, Point]] = []
        for k1, k2 in itertools.combinations(keys, 2):
            for d1, d2 in itertools.product((+1, -1), repeat=2):
                i1, i2 = self.ladder[k1].index(best[k1]) + d1, self.ladder[k2].index(best[k2]) + d2
                if not (0 <= i1 < len(self.ladder[k1]) and 0 <= i2 < len(self.ladder[k2])):
                    continue
                a, b = {**best, k1: self.ladder[k1][i1]}, {**best, k2: self.ladder[k2][i2]}
                point = {**a, k2: b[k2]}
                if not self.fits(point) or self.known(best, point) is not None:
                    continue  # over the budget: its re-planned form is a single step, judged already
                promise = (self.known(best, a) or 1.0) * (self.known(best, b) or 1.0)
                diagonals.append((promise, point))
        for _, point in sorted(diagonals, key=lambda d: -d[0]):
            if self.spent(best):
                self.log(f"auto: pattern stopped: the search has used {self.bench.runs_done} of its {self.cap} runs")
                return None
            if self.gain(best, point) >= 1 + AUTO_MIN_GAIN:
                self.direction = {}
                return point
        return None

    def memory_hint(self, best: Point) -> None:
        """When more memory is what helps ``best``, say so in ``hint``: its runs were held back
        by the memory guard, or a step from it that did not fit the budget, run with the
        memory it needs, gains ``AUTO_MIN_GAIN`` side by side (while runs remain)."""
        chosen = self.result(best)
        plan = self.bench.budget_plan(best)
        if chosen.bottleneck == "memory" and plan is not None:
            limit = limit_for(plan.estimated_peak, plan.budget)
            self.hint = {
                "point": {**best, "resources.memory_limit": limit},
                "why": f"the memory guard held chunks back {chosen.held_back:.1f}s per run (median) "
                f"at {gib(plan.budget)}",
            }
        usable = machine().memory
        for step in self.over_budget.get(point_key(best), []):
            need = self.bench.budget_plan(step)
            if self.hint or need is None or self.spent(best):
                break
            limit = limit_for(need.estimated_peak, need.budget)
            more = {**step, "resources.memory_limit": limit}
            if not self.bench.fits(more) or need.estimated_peak / PLAN_SHARE > usable:
                continue
            gain = self.gain(best, more)
            if gain >= 1 + AUTO_MIN_GAIN:
                self.hint = {"point": more, "gain": gain, "why": f"{gain - 1:+.1%} side by side at {limit}"}
        if self.hint:
            self.log(f"auto: more memory helps: {set_line(self.hint['point'])} ({self.hint['why']})")


# -------------------------------------------------------------------------- output


def ranked(bench: Bench) -> list[PointResult]:
    return sorted((r for r in bench.results.values() if r.runs), key=lambda r: r.throughput, reverse=True)


def write_outputs(bench: Bench, varied: list[str], extra: dict[str, Any]) -> list[Path]:
    """bench.csv, bench.json and the plots; returns the files written."""
    results = ranked(bench)
    out = bench.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "bench.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    doc = {
        "config": str(bench.config),
        "base_overrides": bench.base,
        "repeat": bench.repeat,
        "include_download": bench.include_download,
        "varied": varied,
        "runs": bench.runs_done,
        "cores": usable_cpus(),
        "recommended": recommended(results, extra),
        "recommended_with_more_memory": set_line(extra["memory_hint"]["point"]) if extra.get("memory_hint") else None,
        **extra,
        "points": [
            {**r.row(), "point": r.point, "stage_seconds": r.stage_seconds(), "run_metrics": r.runs} for r in results
        ],
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=2, default=str))
    files = [out / "bench.csv", out / "bench.json"]
    if results:
        files += plot(results, varied, out)
    return files


def plot(results: list[PointResult], varied: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    files = []
    for key in varied:
        fig = throughput_figure(results, varied, key)
        path = out / f"throughput_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    fig = stages_figure(results)
    path = out / "stages_best_worst.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return files + [path]


def throughput_figure(results: list[PointResult], varied: list[str], key: str) -> Any:
    """Rows/s against ``key``: the median of the repeats, with their min-max spread as error
    bars; the axis starts at zero, so a 5% gain looks like 5%."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    others = [k for k in varied if k != key]
    series: dict[str, list[PointResult]] = {}
    for r in results:
        if key in r.point:
            series.setdefault(" ".join(f"{k}={r.point.get(k)}" for k in others), []).append(r)
    top = 0.0
    for name, pts in series.items():
        pts.sort(key=lambda r: _sort_key(r.point[key]))
        y = [r.throughput for r in pts]
        lo = [r.throughput - r.spread("rows_per_s")[0] for r in pts]
        hi = [r.spread("rows_per_s")[1] - r.throughput for r in pts]
        top = max([top, *(r.spread("rows_per_s")[1] for r in pts)])
        ax.errorbar([r.point[key] for r in pts], y, yerr=[lo, hi], marker="o", capsize=3, label=name or None)
    ax.set_ylim(0, top * 1.1 or 1.0)
    ax.set_xlabel(key)
    ax.set_ylabel(f"rows/s (median of {max(len(r.runs) for r in results)} runs; bars: min-max)")
    ax.set_title(f"throughput vs {key}")
    if others:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def stages_figure(results: list[PointResult]) -> Any:
    """Busy / blocked / waiting seconds per stage for the best and worst points: per slot
    (top row: how loaded one thread or worker was) and for all of a stage's slots together
    (bottom row: the worker time the stage cost, which per-slot bars hide when slots differ)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, (title, r) in enumerate((("best", results[0]), ("worst", results[-1]))):
        secs, slots = r.stage_seconds(), r.stage_slots()
        names = list(secs)
        for row, scale in ((0, dict.fromkeys(names, 1.0)), (1, {n: float(slots.get(n, 1)) for n in names})):
            ax = axes[row][col]
            bottom = [0.0] * len(names)
            for part, color in (("busy_s", "tab:red"), ("blocked_s", "tab:orange"), ("wait_s", "tab:gray")):
                vals = [secs[n][part] * scale[n] for n in names]
                ax.bar(names, vals, bottom=bottom, color=color, label=part[:-2])
                bottom = [b + v for b, v in zip(bottom, vals)]
            if row == 1:
                for x, (n, total) in enumerate(zip(names, bottom)):
                    ax.annotate(f"{slots.get(n, 1)}x", (x, total), ha="center", va="bottom", fontsize=7)
        axes[0][col].set_title(f"{title}: {r.label()}", fontsize=8)
        axes[0][col].set_ylabel("seconds per slot (mean of runs)")
        axes[1][col].set_ylabel("worker seconds, all slots")
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def _sort_key(v: str) -> tuple[int, float | str]:
    try:
        return (0, float(v))
    except ValueError:
        return (1, v)


def recommended(results: list[PointResult], extra: dict[str, Any]) -> str | None:
    """The fastest point; after --auto, the search's choice (it ignores gains under 5%: noise).

    When that point was limited by the memory budget (its plan does not fit, or the guard
    held chunks back), the line also raises ``resources.memory_limit`` to what it needs."""
    if "auto_best" in extra:
        point = extra["auto_best"]
        result = next((r for r in results if r.point == point), None)
    elif results:
        point, result = results[0].point, results[0]
    else:
        return None
    if (
        result is not None
        and (not result.fits or result.bottleneck == "memory")
        and "resources.memory_limit" not in point
    ):
        plans = [r.get("plan", {}) for r in result.runs]
        peak, budget = max(p.get("estimated_peak", 0) for p in plans), max(p.get("budget", 0) for p in plans)
        if budget:
            point = {**point, "resources.memory_limit": limit_for(peak, budget)}
    return set_line(point)


def memory_line(extra: dict[str, Any]) -> str | None:
    """After --auto, when more memory is what helps: the settings with the memory they need."""
    hint = extra.get("memory_hint") or {}
    return f"faster with more memory ({hint['why']}): {set_line(hint['point'])}" if hint else None


def format_table(bench: Bench, varied: list[str], extra: dict[str, Any]) -> str:
    results = ranked(bench)
    head = "".join(f"{k:>22}" for k in varied)
    lines = [f"{head}{'wall s (min-max)':>22}{'rows/s':>12}{'MiB/s':>8}{'RSS MiB':>9}{'CPU':>6}  bottleneck"]
    for r in results:
        lo, hi = r.spread("wall_s")
        keys = "".join(f"{r.point.get(k, ''):>22}" for k in varied)
        wall = f"{r.median('wall_s'):.2f} ({lo:.2f}-{hi:.2f})"
        lines.append(
            f"{keys}{wall:>22}{r.throughput:>12,.0f}{r.median('mib_per_s'):>8.1f}"
            f"{r.median('peak_rss_mib'):>9,.0f}{r.median('cpu_util'):>6.0%}  {budget_note(r)}"
        )
    if any(not r.fits for r in results):
        lines.append("OVER BUDGET: the settings do not fit the memory budget (the plan's worst case is over it)")
    if results:
        lines.append(f"recommended: {recommended(results, extra)}")
        more = memory_line(extra)
        if more:
            lines.append(more)
    return "\n".join(lines)


def budget_note(r: PointResult) -> str:
    """The bottleneck column: the stage, with the memory guard's hold-backs and the budget flag."""
    text = r.bottleneck
    if r.held_back >= 0.05:  # under 50 ms held back is a sample's jitter, not a limit
        text += f" (chunks held back {r.held_back:.1f}s)"
    return text + ("" if r.fits else " OVER BUDGET")


# ---------------------------------------------------------------------- command


def bench_command(args: Any) -> int:
    vary = parse_vary(args.vary)
    out = args.out or Path(f"bench-{time.strftime('%Y%m%dT%H%M%S')}")
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {args.repeat}")
    bench = Bench(args.config, args.overrides, out, args.repeat, args.include_download)
    points = grid(vary) if not args.auto else []
    if not args.auto and not vary:
        raise ConfigError("bench needs --vary key=v1,v2 (repeatable) or --auto")
    bench.check(points or [{}])
    code = ExitCode.OK
    extra: dict[str, Any] = {"mode": "auto" if args.auto else "grid"}
    try:
        bench.warm_up()
        if args.auto:
            best = auto_search(bench, vary)
            extra["auto_best"] = best.point
            if bench.auto_hint:
                extra["memory_hint"] = bench.auto_hint
        else:
            bench.measure_grid(points)
    except (Interrupted, KeyboardInterrupt):  # Ctrl-C between two runs lands outside _wait
        print(f"interrupted: keeping the {len(ranked(bench))} points measured so far", file=sys.stderr, flush=True)
        code = ExitCode.INTERRUPTED_INT
    except ETLError:
        write_outputs(bench, list(dict.fromkeys(k for r in bench.results.values() for k in r.point)), extra)
        raise  # the points measured before the failure are kept
    varied = list(dict.fromkeys(k for r in bench.results.values() for k in r.point))
    files = write_outputs(bench, varied, extra)
    print(format_table(bench, varied, extra))
    print(f"{bench.runs_done} runs; wrote {', '.join(f.name for f in files)} to {bench.out}")
    return code

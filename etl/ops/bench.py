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

``--auto`` is a coordinate search driven by the measured bottleneck (see ``auto_search``):
keys whose stage is not the bottleneck are skipped, the others are stepped along their
ladders while a step gains at least ``AUTO_MIN_GAIN``, each step judged by runs of the
candidate and the incumbent side by side, so drift between minutes cancels out.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from etl.core.config import JobConfig, load_job
from etl.core.errors import ConfigError, ETLError, ExitCode
from etl.core.machine import usable_cpus
from etl.core.stats import STAGES

ROOT = Path(__file__).resolve().parents[2]  # etl/ops/bench.py -> the clone (run.py)
AUTO_MIN_GAIN = 0.05  # a step must gain this much throughput to be taken: less is noise here
AUTO_DECISIVE = 0.10  # one side-by-side pair this far from the gain line decides a step alone: not noise
AUTO_STEP_RUNGS = 2  # a step looks this many rungs ahead: more finds gains spread over rungs, costs runs
AUTO_MAX_PASSES = 3  # passes over the keys; each pass starts from the newest bottleneck
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
# size sets how many chunks every later stage handles (per-chunk overhead, part files).
KEY_STAGES = {"read.chunk_rows": ("read", "transform", "write")}


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

    def check(self, points: list[Point]) -> None:
        """Every point must be a valid job before anything runs (a typo fails in a second)."""
        for p in points:
            load_job(self.config, self.base + overrides(p))

    def warm_up(self) -> None:
        print(f"warm-up run (not measured) in {self.out / 'cache'}", flush=True)
        self._run({}, self.out / "cache", keep_staging=True)

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
    }


# --------------------------------------------------------------------------- auto


def ladders(cfg: JobConfig, vary: dict[str, list[str]]) -> dict[str, list[str]]:
    """Candidate values per searched key: the ``--vary`` lists, else ladders around the job's value."""
    cores = usable_cpus()
    out = {
        "transform.workers": sorted({1, 2, 4, cores, 2 * cores}),
        "read.chunk_rows": [25_000, 50_000, 100_000, 200_000, 400_000, 800_000],
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
        return min(ladder, key=lambda v: abs(float(v) - float(node)))
    except (TypeError, ValueError):
        return ladder[0]


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


def auto_search(bench: Bench, vary: dict[str, list[str]], log: Callable[[str], None] = print) -> PointResult:
    """Coordinate search from the job's own settings, led by the measured bottleneck.

    Each pass orders the keys by the best point's bottleneck stage (``key_order``) and
    climbs them one at a time. A key is skipped when none of its stages (``key_stages``) is
    the bottleneck of the best point or of the last run: a faster download cannot help a
    transform-bound run. Climbing steps the key along its ladder while a step of one or two
    rungs (``AUTO_STEP_RUNGS``) gains at least ``AUTO_MIN_GAIN``; a key's first climb tries
    up, then down, and once it has moved it only goes on in that direction.

    A step is judged side by side (``_Search.gain``): runs alternate between the incumbent
    and the candidate (I C I C ...), and every three consecutive runs give one ratio, the
    candidate's geometric mean over the incumbent's (the middle run against the two around
    it); the gain is the median of those ratios (with ``--repeat 1``: one pair, I C). On a
    shared machine the same point drifts by more than 5% between minutes; runs seconds apart
    drift together, and a steady drift cancels exactly between the two outer runs. The
    chain opens with the incumbent's latest run when it was the last run made. One ratio
    far from the 5% line (``AUTO_DECISIVE``) decides alone; otherwise ratios stop once a
    majority of ``repeat`` fall on one side of it. The search stops after a pass without a
    move, or after ``AUTO_MAX_PASSES`` passes.
    """
    search = _Search(bench, ladders(bench.cfg, vary), log)
    best = {k: current_value(bench.cfg, k, v) for k, v in search.ladder.items()}
    search.run(best)
    for n in range(1, AUTO_MAX_PASSES + 1):
        start = best
        for key in key_order(list(search.ladder), search.result(best).bottleneck):
            hot = {search.result(best).bottleneck, search.last_bottleneck}
            stages = key_stages(key)
            if stages and "?" not in hot and not hot.intersection(stages):
                where = " and ".join(sorted(hot)) + (" (best point and last run)" if len(hot) > 1 else "")
                log(f"auto: pass {n}: skipped {key}: it speeds up {'/'.join(stages)}, the bottleneck is {where}")
                continue
            best = search.climb(best, key)
        if best == start:
            break
    chosen = search.result(best)
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

    def run(self, point: Point) -> float:
        """One run of ``point``; its rows/s."""
        self.last_run, self.last_point = self.bench.run_once(point), point_key(point)
        return float(self.last_run["rows_per_s"])

    def result(self, point: Point) -> PointResult:
        return self.bench.results[point_key(point)]

    @property
    def last_bottleneck(self) -> str:
        return str(self.last_run.get("bottleneck", "?"))

    def gain(self, best: Point, candidate: Point) -> float:
        """The candidate's rows/s over the incumbent's, runs side by side (see auto_search)."""
        pair = (point_key(best), point_key(candidate))
        if pair in self.gains:
            return self.gains[pair]
        ratios = self._side_by_side(best, candidate)
        gain = self.gains[pair] = statistics.median(ratios)
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
        return ratios

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
                taken = next(
                    (c for c in ({**best, key: ladder[i]} for i in rungs) if self.gain(best, c) >= 1 + AUTO_MIN_GAIN),
                    None,
                )
                if taken is None:
                    break
                best = taken
            if best != start:
                self.direction[key] = step
                return best
        return best


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
    """The fastest point; after --auto, the search's choice (it ignores gains under 5%: noise)."""
    if "auto_best" in extra:
        return set_line(extra["auto_best"])
    return set_line(results[0].point) if results else None


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
            f"{r.median('peak_rss_mib'):>9,.0f}{r.median('cpu_util'):>6.0%}  {r.bottleneck}"
        )
    if results:
        lines.append(f"recommended: {recommended(results, extra)}")
    return "\n".join(lines)


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

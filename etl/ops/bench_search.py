"""``run.py bench --auto``: a coordinate search over settings, led by the measured bottleneck.

``auto_search`` starts from what a plain run does (the planner's workers and chunk rows,
read from the warm-up run's report): keys whose stage is not the bottleneck are skipped, the
others are stepped along their ladders while a step gains at least ``AUTO_MIN_GAIN``, each
step judged by runs of the candidate and the incumbent side by side, so drift between
minutes cancels out; keys settled before another key moved are re-tested both ways; a step
whose settings do not fit the memory budget is judged with the other keys re-planned to
fit, and a small pattern of diagonal steps around the result catches a point that is fast
only in combination. When more memory is what helps, ``Bench.auto_hint`` says so.

It runs points only through ``Bench.run_once`` and asks ``Bench.fits`` / ``budget_plan``
about the budget (etl/ops/bench_runs.py); the command and the table are in etl/ops/bench.py.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from etl.core.config import JobConfig
from etl.core.machine import machine, usable_cpus
from etl.ops.bench_runs import Bench, Point, PointKey, PointResult, limit_for, point_key, set_line, value_order
from etl.run.resources import PLAN_SHARE, gib

AUTO_MIN_GAIN = 0.05  # a step must gain this much throughput to be taken: less is noise here
AUTO_DECISIVE = 0.10  # one side-by-side pair this far from the gain line decides a step alone: not noise
AUTO_STEP_RUNGS = 2  # a step looks this many rungs ahead: more finds gains spread over rungs, costs runs
AUTO_MAX_PASSES = 3  # passes over the keys; each pass starts from the newest bottleneck
AUTO_RUN_SHARE = 1 / 3  # passes after the first, the diagonal pattern and the memory check stop at this
# share of the grid's runs (the ladders' product x --repeat): more explores further, costs runs
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
            rungs = sorted(self.ladder[key], key=value_order, reverse=True)
            if key == "transform.workers":
                rungs = [r for r in rungs if value_order(r) <= (0, usable_cpus())] or rungs
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

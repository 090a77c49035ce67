"""``run.py bench --auto``'s search, alone: a fake bench whose run_once() returns canned results.

No runs, no timing: which points the search runs and in what order, which keys it skips,
that drift between runs cannot hide a gain, and how it treats the memory budget (steps
re-planned to fit, the more-memory hint). The search run for real, through ``run.py bench
--auto``, is tested in test_bench.py.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from etl.ops.bench import memory_line, ranked, recommended
from etl.ops.bench_runs import Point, PointResult
from etl.ops.bench_search import auto_search, key_stages

VARY = {
    "transform.workers": ["1", "2", "3"],
    "read.chunk_rows": ["25000", "50000", "100000", "200000"],
    "download.concurrency": ["2", "8"],
}
WORKERS = {"1": 1.0, "2": 1.6, "3": 1.55}  # 3 workers lose ~3% to 2 (on two cores)
CHUNKS = {"25000": 1.0, "50000": 1.2, "100000": 1.35, "200000": 1.4}  # 200000 gains ~4% over 100000


class FakeBench:
    """Stands in for ``Bench``: ``run_once`` returns a canned run from ``model``, nothing runs.

    ``drift(n)`` scales the n-th run's rows/s (1, 2, ...): the machine getting busier or quieter.
    """

    def __init__(
        self,
        model: Callable[[Point], tuple[float, str]],
        *,
        workers: int,
        chunk_rows: int,
        concurrency: int,
        repeat: int = 3,
        drift: Callable[[int], float] = lambda n: 1.0,
        fits: Callable[[Point], bool] = lambda p: True,
    ) -> None:
        self.model, self.repeat, self.drift = model, repeat, drift
        self.cfg = SimpleNamespace(
            transform=SimpleNamespace(executor="process", workers=workers),
            read=SimpleNamespace(chunk_rows=chunk_rows),
            download=SimpleNamespace(concurrency=concurrency),
        )
        self.results: dict[tuple[tuple[str, str], ...], PointResult] = {}
        self.measured: list[Point] = []  # every run, in order
        self.runs_done = 0
        self.plain = {"workers": workers, "chunk_rows": chunk_rows}  # a plain run's plan: the start
        self.auto_hint: dict[str, object] = {}
        self.fit = fits

    def fits(self, point: Point) -> bool:
        return self.fit(point)

    def budget_plan(self, point: Point) -> None:
        return None

    def run_once(self, point: Point) -> dict[str, object]:
        self.measured.append(dict(point))
        self.runs_done += 1
        rows_per_s, bottleneck = self.model(point)
        run = {"rows_per_s": rows_per_s * self.drift(self.runs_done), "bottleneck": bottleneck}
        self.results.setdefault(tuple(sorted(point.items())), PointResult(dict(point))).runs.append(run)
        return run


def _p(workers: str, chunk: str, conc: str) -> Point:
    return {"transform.workers": workers, "read.chunk_rows": chunk, "download.concurrency": conc}


def _points(bench: FakeBench) -> list[Point]:
    """The distinct points run, in the order first run."""
    return [dict(k) for k in dict.fromkeys(tuple(sorted(p.items())) for p in bench.measured)]


def test_auto_skips_a_key_whose_stage_never_bottlenecks(capsys: pytest.CaptureFixture[str]) -> None:
    # Download concurrency 2 would look 50% faster if it were measured, but the run is always
    # transform-bound, so the search must never try it.
    def model(p: Point) -> tuple[float, str]:
        conc = 1.5 if p["download.concurrency"] == "2" else 1.0
        return 100_000 * WORKERS[p["transform.workers"]] * CHUNKS[p["read.chunk_rows"]] * conc, "transform"

    bench = FakeBench(model, workers=1, chunk_rows=25_000, concurrency=8)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert _points(bench) == [
        _p("1", "25000", "8"),  # the job's own settings
        _p("2", "25000", "8"),
        _p("3", "25000", "8"),  # workers: 2 gains, 3 does not
        _p("2", "50000", "8"),
        _p("2", "100000", "8"),
        _p("2", "200000", "8"),  # chunk rows up
        _p("3", "100000", "8"),  # second pass: workers again from the new point, both ways:
        _p("1", "100000", "8"),  # the chunk size moved since workers settled
    ]
    assert best.point == _p("2", "100000", "8")  # 200000 gains ~4% over 100000: under the 5% line
    assert bench.runs_done <= 24 * 3 // 3  # a third of the 24-point grid at 3 runs per point
    out = capsys.readouterr().out
    assert "skipped download.concurrency: it speeds up download, the bottleneck is transform" in out
    assert "skipped transform.workers" not in out and "skipped read.chunk_rows" not in out
    assert (
        "chunk_rows=200000 vs transform.workers=2 read.chunk_rows=100000 download.concurrency=8: +3.7% side by side"
        in out
    )


def test_auto_climbs_the_key_of_the_bottleneck_first_and_follows_it_when_it_moves() -> None:
    # Download-bound at concurrency 2; concurrency 8 moves the bottleneck to transform.
    def model(p: Point) -> tuple[float, str]:
        conc, stage = (1.0, "download") if p["download.concurrency"] == "2" else (1.5, "transform")
        return 100_000 * WORKERS[p["transform.workers"]] * CHUNKS[p["read.chunk_rows"]] * conc, stage

    bench = FakeBench(model, workers=1, chunk_rows=25_000, concurrency=2)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert _points(bench)[:3] == [_p("1", "25000", "2"), _p("1", "25000", "8"), _p("2", "25000", "8")]
    assert best.point == _p("2", "100000", "8")


def test_auto_judges_a_step_side_by_side_so_drift_cannot_hide_a_gain() -> None:
    # Each chunk-size rung gains 8%, while the machine gets 4% slower with every run: against
    # the incumbent's earlier figure no step would look like a gain, side by side each does.
    chunks = {"25000": 1.0, "50000": 1.08, "100000": 1.08**2, "200000": 1.08**3}

    def model(p: Point) -> tuple[float, str]:
        return 100_000 * chunks[p["read.chunk_rows"]], "transform"

    bench = FakeBench(model, workers=2, chunk_rows=25_000, concurrency=8, drift=lambda n: 0.96**n)
    best = auto_search(
        bench, {"read.chunk_rows": list(chunks), "transform.workers": ["2"], "download.concurrency": ["8"]}
    )
    assert best.point["read.chunk_rows"] == "200000"
    assert max(r["rows_per_s"] for r in best.runs) < 100_000  # below the start's own first figure


def test_auto_stops_pairing_once_a_majority_agrees() -> None:
    # A clear gain (+60%) is decided by one pair; a clear non-gain (+1%) by two of three.
    def model(p: Point) -> tuple[float, str]:
        return 100_000 * {"1": 1.0, "2": 1.6, "3": 1.62}[p["transform.workers"]], "transform"

    bench = FakeBench(model, workers=1, chunk_rows=25_000, concurrency=8)
    best = auto_search(
        bench, {"transform.workers": ["1", "2", "3"], "read.chunk_rows": ["25000"], "download.concurrency": ["8"]}
    )
    assert best.point["transform.workers"] == "2"  # 3 gains 1.2% over 2 workers: under the line
    # runs alternate; the first comparison opens with the start's own run, the second needs a
    # fresh run of its incumbent (the last run was the old one) and takes two triples
    assert [p["transform.workers"] for p in bench.measured] == ["1", "2", "1", "2", "3", "2", "3"]


def test_key_stages() -> None:
    assert key_stages("transform.workers") == ("transform", "memory")  # held back by the guard: fewer help
    assert key_stages("download.concurrency") == ("download",)
    assert key_stages("output.compression") == ("write",)
    assert set(key_stages("read.chunk_rows")) == {
        "read",
        "transform",
        "write",
        "memory",
    }  # chunk count drives later stages
    assert key_stages("resources.memory_limit") == ()  # unknown: never skipped


def test_auto_looks_two_rungs_ahead_when_one_rung_gains_too_little() -> None:
    # 50000 -> 100000 gains 2.5% (under the 5% rule), 50000 -> 200000 gains 10%: found.
    chunks = {"25000": 1.0, "50000": 1.2, "100000": 1.23, "200000": 1.32}

    def model(p: Point) -> tuple[float, str]:
        return 100_000 * WORKERS[p["transform.workers"]] * chunks[p["read.chunk_rows"]], "transform"

    bench = FakeBench(model, workers=2, chunk_rows=25_000, concurrency=8)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert best.point == _p("2", "200000", "8")
    assert _p("2", "100000", "8") in bench.measured  # the rung in between was measured, not taken
    assert bench.runs_done <= 24


# ------------------------------------------------------- traps: combinations and the budget


def test_auto_starts_from_the_plan_of_a_plain_run_not_the_job_files_values() -> None:
    bench = FakeBench(lambda p: (100_000.0, "transform"), workers=2, chunk_rows=200_000, concurrency=8)
    bench.plain = {"workers": 2, "chunk_rows": 50_000}  # the planner halved the job file's 200,000
    auto_search(bench, VARY)  # type: ignore[arg-type]
    assert bench.measured[0] == _p("2", "50000", "8")
    bench = FakeBench(lambda p: (100_000.0, "transform"), workers=2, chunk_rows=200_000, concurrency=8)
    bench.plain = {"workers": 2, "chunk_rows": 62_500}  # off the ladder: the nearest rung (log scale)
    auto_search(bench, VARY)  # type: ignore[arg-type]
    assert bench.measured[0] == _p("2", "50000", "8")


def test_auto_finds_a_point_fast_only_in_combination(capsys: pytest.CaptureFixture[str]) -> None:
    # From the plan's 1 worker x 25,000 rows every single step loses a little (2 workers -2%,
    # 50,000 rows -1%, the rest level), but 2 workers with 50,000-row chunks run 60% faster:
    # a coordinate search stops at the start; the pattern of diagonal steps finds it.
    def model(p: Point) -> tuple[float, str]:
        w, c = p["transform.workers"], p["read.chunk_rows"]
        speed = {("2", "50000"): 1.6, ("2", "25000"): 0.98, ("1", "50000"): 0.99}.get((w, c), 1.0)
        return 100_000 * speed, "transform"

    bench = FakeBench(model, workers=1, chunk_rows=25_000, concurrency=8)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert best.point == _p("2", "50000", "8")
    assert bench.runs_done <= 24 * 3 // 3  # a third of the 24-point grid at 3 runs per point
    out = capsys.readouterr().out
    assert "workers=2 chunk_rows=50000 vs transform.workers=1 read.chunk_rows=25000" in out  # one diagonal step


def _budget_model(p: Point) -> tuple[float, str]:
    """The issue's job: 2 workers at 200,000 rows do not fit the budget and the guard throttles
    them (as slow as 1 worker); 1 worker is slower everywhere; 100,000 rows is best."""
    w, c = p["transform.workers"], int(p["read.chunk_rows"])
    if "resources.memory_limit" in p:  # room for every chunk in flight: nothing held back
        return 100_000 * {"1": 0.64, "2": 1.25, "3": 1.2}[w], "transform"
    if not _fits(p):
        return 60_000.0, "memory"
    return 100_000 * ({"1": 0.62, "2": 1.0, "3": 0.97}[w] + (0.1 if c == 100_000 else 0.0)), "transform"


def _fits(p: Point) -> bool:
    w, c = int(p["transform.workers"]), int(p["read.chunk_rows"])
    return "resources.memory_limit" in p or w * c < 400_000


def test_a_step_over_the_budget_is_judged_with_the_other_keys_replanned(capsys: pytest.CaptureFixture[str]) -> None:
    bench = FakeBench(_budget_model, workers=2, chunk_rows=50_000, concurrency=8, fits=_fits)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert best.point == _p("2", "100000", "8")  # not 1 worker: the pick was 64% of the best
    assert all(_fits(p) for p in bench.measured)  # never a throttled point: a step there is re-planned
    assert _p("1", "200000", "8") in bench.measured  # 200,000 rows judged with workers re-planned to fit
    out = capsys.readouterr().out
    assert "chunk_rows=200000 does not fit the memory budget: judged re-planned, workers=1" in out
    assert bench.runs_done <= 24


def test_when_more_memory_helps_the_recommendation_says_so_and_keeps_the_best_fitting_point(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = FakeBench(_budget_model, workers=2, chunk_rows=50_000, concurrency=8, fits=_fits)
    gib = 1 << 30

    def plan(p: Point) -> SimpleNamespace:  # the planner's worst case: 300 MiB + 2 KiB per row in flight
        rows = int(p["transform.workers"]) * int(p["read.chunk_rows"])
        return SimpleNamespace(estimated_peak=(300 << 20) + rows * 2048, budget=gib, fits=_fits(p))

    bench.budget_plan = plan  # type: ignore[method-assign]
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert best.point == _p("2", "100000", "8")
    # 2 x 200,000 rows need 300 MiB + 781 MiB = 1.06 GiB worst case, / 0.8 -> 1.33 GiB -> 1536 MiB
    assert bench.auto_hint["point"] == {**_p("2", "200000", "8"), "resources.memory_limit": "1536MiB"}
    extra = {"mode": "auto", "auto_best": best.point, "memory_hint": bench.auto_hint}
    assert recommended(ranked(bench), extra) == (  # type: ignore[arg-type]
        "--set transform.workers=2 --set read.chunk_rows=100000 --set download.concurrency=8"
    )
    line = memory_line(extra)
    assert line is not None and line.startswith("faster with more memory (+13.6% side by side at 1536MiB): ")
    assert line.endswith(
        "--set read.chunk_rows=200000 --set download.concurrency=8 --set resources.memory_limit=1536MiB"
    )
    assert bench.runs_done <= 24
    assert "more memory helps" in capsys.readouterr().out


def test_a_step_held_back_by_the_guard_though_planned_to_fit_is_judged_replanned(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The planner's estimate misses: it says 2 workers at 200,000 rows fit, but their runs are
    # held back (bottleneck memory) and slow. Re-planned on the measurement, 1 worker at
    # 200,000 rows runs 20% faster than the start: found, where a plain step would stop.
    monkeypatch.setattr("etl.ops.bench_search.usable_cpus", lambda: 2)  # the planner's worker cap

    def model(p: Point) -> tuple[float, str]:
        w, c = p["transform.workers"], p["read.chunk_rows"]
        if c == "200000":
            return (60_000.0, "memory") if w != "1" else (120_000.0, "transform")
        return 100_000.0 * (0.6 if w == "1" else 1.0), "transform"

    bench = FakeBench(model, workers=2, chunk_rows=50_000, concurrency=8)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert best.point == _p("1", "200000", "8")
    out = capsys.readouterr().out
    assert (
        "read.chunk_rows=200000 download.concurrency=8 was held back by the memory guard: re-planned, workers=1" in out
    )
    assert bench.runs_done <= 24


def test_after_a_replanned_step_the_stepped_key_is_tried_back_too() -> None:
    # 3 workers do not fit at 50,000 rows: the step is judged re-planned at 25,000 rows (+10%).
    # That changed two keys at once; 2 workers at 25,000 rows (+30%) is a step back on workers.
    def model(p: Point) -> tuple[float, str]:
        speed = {("3", "25000"): 1.1, ("2", "25000"): 1.3}.get((p["transform.workers"], p["read.chunk_rows"]), 1.0)
        return 100_000 * speed, "transform"

    def fits(p: Point) -> bool:
        return not (p["transform.workers"] == "3" and int(p["read.chunk_rows"]) >= 50_000)

    bench = FakeBench(model, workers=2, chunk_rows=50_000, concurrency=8, fits=fits)
    best = auto_search(bench, VARY)  # type: ignore[arg-type]
    assert best.point == _p("2", "25000", "8")
    assert bench.runs_done <= 24

"""``python run.py bench``: run a job over a grid of settings (or search them) and compare.

This module is the command and what it reports; the measuring is in etl/ops/bench_runs.py
(``Bench``: each run its own ``run.py run`` process, a warm-up run first, a grid in rounds)
and the ``--auto`` search in etl/ops/bench_search.py.

Per point: median and spread (min-max) of wall time, rows/s, MiB/s; median peak RSS, CPU
use; the most frequent bottleneck. Writes ``bench.csv``, ``bench.json`` and PNG plots to the
output folder, also after Ctrl-C (with the points measured so far), and prints the table
with the recommended settings (after ``--auto``, the search's choice).

The memory budget: the table flags points whose settings do not fit the budget and the
seconds the memory guard held chunks back; when more memory is what helps, the
recommendation says so with a ``--set resources.memory_limit=…`` line.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from etl.core.errors import ConfigError, ETLError, ExitCode
from etl.core.machine import usable_cpus
from etl.ops.bench_runs import Bench, Interrupted, PointResult, grid, limit_for, parse_vary, set_line, value_order
from etl.ops.bench_search import auto_search

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
        pts.sort(key=lambda r: value_order(r.point[key]))
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

"""Memory benchmark: peak RSS of the whole process tree as the input grows 1x, 4x, 16x.

    python benchmarks/memory.py                       # 1M, 4M, 16M rows, 3 runs each
    python benchmarks/memory.py --rows 1000000 --scales 1,4 --repeat 1

Runs the transform benchmark's job (benchmarks/jobs/transform.toml: parse_datetime, cast,
fillna, filter, derive, lookup, zstd Parquet partitioned by month) at default settings
(``transform.workers = "auto"``, ``resources.memory_limit = "auto"``) on generated trips,
always in the same number of files, so files grow with the input too. Engines:

* **etl (HTTP)**: the job as the benchmark runs it, sources served over HTTP: the plan has
  no local file to measure and uses its fallback estimates.
* **etl (local)**: the same job on the local files: the plan measures the first chunk.
* **plain pandas (read all)**: read every file, concatenate, transform, write (the same
  transform and writer as benchmarks/baselines/plain_pandas.py); skipped above
  ``--pandas-max-rows``, since it needs memory in proportion to the input.

Figures per run come from ``benchmarks.common.measure`` (peak RSS summed over the tree,
sampled every 0.1 s; CPU seconds of every process); the etl run's own guard figures (its
sampled peak, budget, plan) come from its JSON run report. Medians are printed and written
to ``benchmarks/results/memory.md``. Checks: the etl peak stays within ``FLAT_TOLERANCE``
from the smallest to the largest input, under the run's budget, and under ``DEFAULT_CEILING``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import Server, machine, measure
from benchmarks.engines import Engine, Paths, check_output, command
from benchmarks.run_transform import dataset

FLAT_TOLERANCE = 0.15  # the bar: peak RSS may vary this much from 1x to 16x input
DEFAULT_CEILING = 1 << 30  # the bar: at default settings, under 1 GiB whatever the input
DEFAULTS = ('transform.workers="auto"', 'resources.memory_limit="auto"')

PANDAS_READ_ALL = """
import sys
from pathlib import Path
import pandas as pd
sys.path.insert(0, {baselines!r})
from plain_pandas import read, read_zones, transform, write
out, zones, files = Path(sys.argv[1]), read_zones(sys.argv[2]), sys.argv[3:]
df = pd.concat([read(f) for f in files], ignore_index=True)
write(transform(df, zones), out, "part")
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows at 1x")
    p.add_argument("--scales", default="1,4,16")
    p.add_argument("--files", type=int, default=4, help="files at every scale (files grow with the input)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pandas-max-rows", type=int, default=4_000_000)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def etl_run(engine: Engine, data: Path, server: Server, files: int, work: Path) -> dict:
    out, state = work / "out", work / "state"
    paths = Paths(data, server.url, files, out, state)
    argv, env = command(engine, paths, workers=0)
    m = measure(argv, env={**os.environ, **env}, exclude={server.pid})
    if m.returncode != 0:
        raise RuntimeError(f"{engine.name} failed:\n{m.output[-3000:]}")
    report = json.loads(max(state.glob("*/reports/run-*.json")).read_text())["summary"]
    return {
        "wall": m.wall,
        "cpu": m.cpu,
        "peak": m.peak_rss,
        "rows": check_output(out)["rows"],
        "guard_peak": report["memory"]["peak_rss_bytes"],
        "budget": report["plan"]["budget"],
        "decision": report["plan"]["decision"],
        "forced": report["memory"]["forced_admits"],
    }


def pandas_run(data: Path, files: int, work: Path) -> dict:
    out = work / "out"
    code = PANDAS_READ_ALL.format(baselines=str(HERE / "baselines"))
    srcs = [str(data / f"trips-{i:03d}.csv.gz") for i in range(files)]
    m = measure([sys.executable, "-c", code, str(out), str(data / "zones.csv"), *srcs])
    if m.returncode != 0:
        raise RuntimeError(f"plain pandas failed:\n{m.output[-3000:]}")
    return {"wall": m.wall, "cpu": m.cpu, "peak": m.peak_rss, "rows": check_output(out)["rows"]}


def median_of(runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "peak")}
    return {**runs[-1], **med, "runs": len(runs)}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]
    etl_engines = [Engine("etl (HTTP)", "etl", DEFAULTS), Engine("etl (local)", "etl", DEFAULTS)]
    rows_out: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    started = time.perf_counter()
    try:
        for scale in scales:
            rows = args.rows * scale
            data = dataset(args.data_dir, rows, args.files)
            server = Server(data)
            try:
                for engine in etl_engines:
                    if engine.name == "etl (local)":
                        local = f'sources.urls=["{data}/trips-*.csv.gz"]'
                        engine = Engine(engine.name, "etl", (*DEFAULTS, local))
                    runs = []
                    for _ in range(args.repeat):
                        shutil.rmtree(work, ignore_errors=True)
                        runs.append(etl_run(engine, data, server, args.files, work))
                    rows_out.append({"engine": engine.name, "scale": scale, "input_rows": rows, **median_of(runs)})
                    print_row(rows_out[-1])
            finally:
                server.stop()
            if rows <= args.pandas_max_rows:
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(work, ignore_errors=True)
                    runs.append(pandas_run(data, args.files, work))
                rows_out.append(
                    {"engine": "plain pandas (read all)", "scale": scale, "input_rows": rows, **median_of(runs)}
                )
                print_row(rows_out[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checks = verdicts(rows_out)
    text = render(rows_out, checks, args, time.perf_counter() - started)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "memory.md").write_text(text)
    (args.results / "memory.json").write_text(json.dumps({"machine": machine(), "rows": rows_out}, indent=2))
    return 0 if all(ok for _, ok in checks) else 1


def print_row(r: dict) -> None:
    print(
        f"{r['engine']:<24} {r['input_rows']:>11,} rows  peak {mib(r['peak']):>7} MiB  "
        f"wall {r['wall']:6.1f}s  cpu {r['cpu']:6.1f}s",
        flush=True,
    )


def verdicts(rows: list[dict]) -> list[tuple[str, bool]]:
    out = []
    for name in ("etl (HTTP)", "etl (local)"):
        mine = [r for r in rows if r["engine"] == name]
        if not mine:
            continue
        low, high = min(r["peak"] for r in mine), max(r["peak"] for r in mine)
        flat = f"{name}: peak flat within {FLAT_TOLERANCE:.0%} ({mib(low)}..{mib(high)} MiB, {high / low - 1:+.0%})"
        out.append((flat, high <= low * (1 + FLAT_TOLERANCE)))
        out.append((f"{name}: under the budget at every size", all(r["peak"] < r["budget"] for r in mine)))
        out.append(
            (
                f"{name}: under {mib(DEFAULT_CEILING)} MiB at default settings",
                all(r["peak"] < DEFAULT_CEILING for r in mine),
            )
        )
    return out


def render(rows: list[dict], checks: list[tuple[str, bool]], args: argparse.Namespace, seconds: float) -> str:
    m = machine()
    lines = [
        "# Memory: peak process-tree RSS as the input grows",
        "",
        (
            f"`python benchmarks/memory.py --rows {args.rows} --scales {args.scales} --files {args.files} "
            f"--repeat {args.repeat}` on {m['cores']} cores, {m['memory_gib']} GiB ({m['cpu']}); "
            f"medians of {args.repeat} run(s); {seconds / 60:.0f} min in all. Peak RSS is summed over the "
            "whole process tree (parent, fork server, workers), sampled every 0.1 s."
        ),
        "",
        "| engine | input rows | peak RSS MiB | x 1x peak | run's own sampled peak MiB | budget MiB | wall s | CPU s | rows out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = next(b for b in rows if b["engine"] == r["engine"])
        guard = mib(r["guard_peak"]) if "guard_peak" in r else "-"
        budget = mib(r["budget"]) if "budget" in r else "-"
        lines.append(
            f"| {r['engine']} | {r['input_rows']:,} | {mib(r['peak'])} | {r['peak'] / base['peak']:.2f} | "
            f"{guard} | {budget} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rows']:,} |"
        )
    lines += ["", "Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    lines += ["", "Plans (largest input):", ""]
    for name in ("etl (HTTP)", "etl (local)"):
        mine = [r for r in rows if r["engine"] == name]
        if mine:
            lines.append(f"- {name}: {mine[-1]['decision']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

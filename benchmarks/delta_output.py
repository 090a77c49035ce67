"""Delta Lake output (issue 16 item 3): what a Delta table costs against a Parquet folder.

    python benchmarks/delta_output.py --rows 2000000 --files 4 --repeat 3

Runs the transform benchmark's job (``jobs/transform.toml``, partitioned by month) on the
generated trips read from local files (``run.py generate``; no HTTP server, so the write
side weighs more) in three variants, ``--repeat`` times, interleaved and in rotating order
so a slow spell on a shared machine hits every variant:

* ``parquet``: the Parquet folder (``format = "parquet"``, overwrite), the reference;
* ``delta``: the same files committed as a Delta table (``format = "delta"``, overwrite,
  one new version per run, old files kept for time travel);
* ``delta-append``: appending to a Delta table (one version per run; the table grows).

Each run is measured by ``benchmarks.common.measure`` (wall, CPU of the process tree,
sampled peak RSS); for Delta runs the log's ``publish took`` figure (links, plan, commit)
is read too. Prints a markdown table of medians with each variant's ratio to ``parquet``
and writes ``--results/<name>.md`` and ``<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import REPO, machine, measure
from benchmarks.run_transform import dataset

JOB = REPO / "benchmarks" / "jobs" / "transform.toml"
VARIANTS = {
    "parquet": [],
    "delta": ['output.format="delta"'],
    "delta-append": ['output.format="delta"', 'output.mode="append"'],
}
_PUBLISH = re.compile(r"publish took ([0-9.]+) s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="job override for every variant")
    p.add_argument("--data-dir", type=Path, default=REPO / "benchmarks" / "data")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="delta-output")
    p.add_argument("--timeout", type=float, default=3600.0)
    return p.parse_args(argv)


def run_once(variant: str, args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    out = work / variant
    if variant != "delta-append":  # overwrite variants start from a clean slate each time
        shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "BENCH_STATE": str(work / f"state-{variant}"),
        "BENCH_URLS": str(data / "trips-*.csv.gz"),
        "BENCH_DATA": str(data),
        "BENCH_OUT": str(out),
    }
    sets = [f"transform.workers={args.workers}", *VARIANTS[variant], *args.overrides]
    cmd = [sys.executable, str(REPO / "run.py"), "run", "--config", str(JOB), "--full-refresh"]
    for s in sets:
        cmd += ["--set", s]
    m = measure(cmd, env=env, timeout=args.timeout)
    if m.returncode not in (0, 3):
        raise SystemExit(f"{variant}: exit {m.returncode}\n{m.output[-3000:]}")
    publish = _PUBLISH.findall(m.output)
    return {
        "wall": m.wall,
        "cpu": m.cpu,
        "peak_mib": m.peak_rss / 2**20,
        "publish": float(publish[-1]) if publish else None,
    }


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    base = {k: median([r[k] for r in results["parquet"]]) for k in ("wall", "cpu")}
    lines = [
        "| variant | wall s | CPU s | peak MiB | publish s | wall / parquet | CPU / parquet |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, runs in results.items():
        wall, cpu = median([r["wall"] for r in runs]), median([r["cpu"] for r in runs])
        peak, publish = median([r["peak_mib"] for r in runs]), median([r["publish"] for r in runs])
        assert wall is not None and cpu is not None and peak is not None
        bw, bc = base["wall"] or 1.0, base["cpu"] or 1.0
        lines.append(
            f"| {variant} | {wall:.2f} | {cpu:.2f} | {peak:.0f} | "
            f"{'-' if publish is None else f'{publish:.3f}'} | {wall / bw:.3f} | {cpu / bc:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = dataset(args.data_dir, args.rows, args.files)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        work = Path(tmp)
        for i in range(args.repeat):
            order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no variant always first
            for variant in order:
                r = run_once(variant, args, data, work)
                results[variant].append(r)
                print(f"run {i + 1}/{args.repeat} {variant}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s", flush=True)
    text = table(results)
    title = f"Delta output against a Parquet folder: {args.rows:,} rows in {args.files} files, medians of {args.repeat}"
    report = f"# {title}\n\nCommand: `python benchmarks/delta_output.py --rows {args.rows} --files {args.files} --repeat {args.repeat}`\n\n{text}\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(report)
    payload = {"rows": args.rows, "files": args.files, "repeat": args.repeat, "machine": machine(), "runs": results}
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()

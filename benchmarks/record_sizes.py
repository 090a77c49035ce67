"""Long records and wide rows against the memory budget: peak process-tree RSS (issue 18).

    python benchmarks/record_sizes.py --repeat 3

Two local CSV files, each run with ``resources.memory_limit`` (default 1 GiB) and the
plan's own choice of workers and chunk size (process executor, 2 workers at most):

* ``record``: ``--short-rows`` short rows, one record of ``--record-mib`` MiB (default 60,
  near the 64 MiB ``read.max_record_bytes``) in the middle, then more short rows;
* ``wide``: ``--wide-rows`` rows of 20 KB each (the issue's 1,159 MiB case).

The tree is sampled every 50 ms from the command's start (planning and the probe
included). Checks: every case's median peak is at or below the budget + 10%. Medians (and
the min-max spread) are printed and written to ``benchmarks/results/record_sizes.md`` and
``.json``, with each run's plan.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import common
from benchmarks.common import machine, measure

SAMPLE_SECONDS = 0.05  # the sampling period for the tree's peak
OVER_BUDGET = 0.10  # the bar: peak at most the budget plus this share
WIDE_ROW_BYTES = 20_000  # the wide rows
JOB = """
[job]
name = "{name}"
state_dir = "{state}"

[sources]
urls = ["{source}"]

[resources]
memory_limit = "{budget}"

[transform]
on_error = "quarantine"
steps = [{{op = "cast", columns = {{n = "int64"}}}}]

[output]
path = "{out}"
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget", default="1GiB")
    p.add_argument("--record-mib", type=int, default=60)
    p.add_argument("--short-rows", type=int, default=20_000)
    p.add_argument("--wide-rows", type=int, default=12_000)
    p.add_argument("--cases", default="record,wide")
    p.add_argument("--results", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def write_record(path: Path, record_mib: int, short_rows: int) -> None:
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w") as f:
        f.write("id,note,n\n")
        for i in range(short_rows):
            f.write(f"{i},{rng.choice(letters) * 20},{i}\n")
            if i == short_rows // 2:
                block = "".join(rng.choice(letters) for _ in range(1 << 16))
                f.write(f"L,{block * (record_mib << 4)},0\n")  # 64 KiB * 16 per MiB


def write_wide(path: Path, rows: int) -> None:
    rng = random.Random(2)
    block = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(WIDE_ROW_BYTES * 4))
    with path.open("w") as f:
        f.write("id,note,n\n")
        for i in range(rows):
            start = rng.randrange(0, len(block) - WIDE_ROW_BYTES)
            f.write(f"{i},{block[start : start + WIDE_ROW_BYTES]},{i}\n")


def run_once(case: str, source: Path, budget: str, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    job = work / "job.toml"
    job.write_text(JOB.format(name=case, state=work / "state", source=source, budget=budget, out=work / "out"))
    argv = [sys.executable, str(HERE.parent / "run.py"), "--config", str(job), "--quiet"]
    m = measure(argv, env=dict(os.environ))
    if m.returncode not in (0, 3):
        raise RuntimeError(f"{case} at {budget} failed:\n{m.output[-3000:]}")
    report = json.loads(max((work / "state").glob("*/reports/run-*.json")).read_text())["summary"]
    return {
        "case": case,
        "wall": m.wall,
        "peak": m.peak_rss,
        "own_peak": report["memory"]["peak_rss_bytes"],
        "rows_out": report["rows_out"],
        "rows_rejected": report["rows_rejected"],
        "exit": m.returncode,
        "decision": report["plan"]["decision"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.SAMPLE_SECONDS = SAMPLE_SECONDS
    budget = common_size(args.budget)
    data = Path(tempfile.mkdtemp(prefix="bench-records-data-"))
    work = Path(tempfile.mkdtemp(prefix="bench-records-"))
    cases = args.cases.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    try:
        sources = {}
        if "record" in cases:
            sources["record"] = data / "record.csv"
            write_record(sources["record"], args.record_mib, args.short_rows)
        if "wide" in cases:
            sources["wide"] = data / "wide.csv"
            write_wide(sources["wide"], args.wide_rows)
        for _ in range(args.repeat):
            for case in cases:
                r = run_once(case, sources[case], args.budget, work / case)
                runs[case].append(r)
                print(
                    f"{case:>7}: peak {r['peak'] / 2**20:6.0f} MiB (own sampler {r['own_peak'] / 2**20:4.0f}), "
                    f"wall {r['wall']:5.1f}s, exit {r['exit']}",
                    flush=True,
                )
        sizes = {c: p.stat().st_size for c, p in sources.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    m = machine()
    lines = [
        f"# Long records and wide rows at {args.budget}",
        "",
        f"`python benchmarks/record_sizes.py --repeat {args.repeat} --budget {args.budget} "
        f"--record-mib {args.record_mib} --short-rows {args.short_rows} --wide-rows {args.wide_rows}` "
        f"on {m['cores']} cores, {m['memory_gib']} GiB ({m['cpu']}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"medians of {args.repeat} (min-max); tree sampled every {SAMPLE_SECONDS * 1000:.0f} ms from the command's start.",
        "",
        "| case | file MiB | peak RSS MiB (whole tree) | peak / budget | run's own peak MiB | wall s | rows out / rejected | plan |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    checks = []
    for case in cases:
        rs = runs[case]
        peak = statistics.median(r["peak"] for r in rs)
        lo, hi = min(r["peak"] for r in rs), max(r["peak"] for r in rs)
        lines.append(
            f"| {case} | {sizes[case] / 2**20:,.0f} | {peak / 2**20:,.0f} ({lo / 2**20:,.0f}-{hi / 2**20:,.0f}) | "
            f"{peak / budget:.2f} | {statistics.median(r['own_peak'] for r in rs) / 2**20:,.0f} | "
            f"{statistics.median(r['wall'] for r in rs):.1f} | {rs[-1]['rows_out']:,} / {rs[-1]['rows_rejected']:,} | "
            f"{rs[-1]['decision']} |"
        )
        limit = budget * (1 + OVER_BUDGET)
        checks.append((f"{case}: peak {peak / 2**20:.0f} MiB <= {limit / 2**20:.0f} MiB (budget + 10%)", peak <= limit))
    lines += ["", *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "record_sizes.md").write_text(text)
    (args.results / "record_sizes.json").write_text(
        json.dumps({"machine": m, "args": vars(args) | {"results": str(args.results)}, "runs": runs}, indent=2)
    )
    return 0 if all(ok for _, ok in checks) else 1


def common_size(text: str) -> int:
    from etl.core.config import parse_size

    return parse_size(text)


if __name__ == "__main__":
    sys.exit(main())

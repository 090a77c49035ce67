"""Profile one run of a benchmark job with py-spy and print where the CPU goes (issue #15).

    python benchmarks/profile_shape.py --job wide --rows 1000000 --files 2 --name profile-wide

Generates (or reuses) the job's data under ``benchmarks/data``, runs
``py-spy record --subprocesses -f raw -- python run.py --config <job> --full-refresh``
on the local files at default settings (no ``--set``; no HTTP server: the profile is
about CPU, not the network), and sorts every sample into a share of the run: the
parent (imports, gunzip and cutting, writing, the rest) and the workers (CSV parsing,
casts, timestamps, expressions, lookup, Parquet encoding, the rest). Writes the table to
``--results/<name>.md`` and ``.json``; The raw file stays in the temp folder; ``--raw FILE`` only summarises an existing py-spy
raw file. ``--root DIR`` profiles another working copy (a before/after of a change).

py-spy samples wall-clock stacks of running threads (``--idle`` off): a share here is of
the samples, which on a busy run is close to its share of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.engines import jobs

HERE = Path(__file__).resolve().parent
RATE = 100  # py-spy samples per second: more resolves short calls, costs the profiled run more

# (category, pattern in the stack), first match wins; worker stacks are those with run_chunk.
WORKER = (
    ("parse CSV", "parse_csv_chunk"),
    ("timestamps (parse_datetime)", "_to_timestamp"),
    ("casts (trim, checked cast, masks)", "cast_column"),
    ("filter / derive expressions", r"etl/transform/expr\.py"),
    ("lookup", "_lookup"),
    ("output pieces (split by partition, Arrow IPC to the spool)", "encode_parts|encode_rejects"),
    ("other steps", "apply_steps"),
)
PARENT = (
    ("imports", "_find_and_load"),
    ("gunzip", r"zlib|gzip|decompress"),
    # before cutting: a reader thread that hands a chunk to the writer encodes row groups too
    ("writing", r"etl/write/"),
    ("cutting", r"record_end|count_byte|_cut|etl/read/"),
)


# Leaf frames of a thread blocked in a wait: py-spy counts some of them as active.
IDLE = re.compile(
    r"^(_worker|_Slot\.run|\w*Selector\.select|Condition\.wait|Event\.wait|Connection\._recv|_wait_for_tstate_lock|sleep) "
)


CODE = re.compile(r"^\S.* \([^()]*:\d+\)$")  # a Python frame: "function (file.py:line)"


def classify(stack: str) -> tuple[str, str]:
    """(side, category) of one sampled stack; side "idle" for waits and frameless samples.
    A stack's process labels say where it ran: a forkserver child is a worker."""
    frames = stack.split(";")  # a process label may hold ";" itself (python -c "...; ...")
    code = [f for f in frames if CODE.match(f)]
    if not code or IDLE.match(code[-1]):
        return "idle", "waiting (blocked thread) or no Python frame (native thread)"
    if "etl/transform/probe.py" in stack or "etl/run/probe.py" in stack:
        return "planner", "warm-up probe (a chunk run to measure memory)"
    in_worker = "-c from multiprocessing" in stack  # a forkserver child (or the resource tracker)
    if "run_chunk" in stack:
        return "workers", next((c for c, p in WORKER if re.search(p, stack)), "worker other")
    if in_worker:
        return "workers", "start-up imports" if "_find_and_load" in stack else "start-up, IPC"
    return "parent", next((c for c, p in PARENT if re.search(p, stack)), "parent other")


def summarise(raw: Path) -> dict[str, object]:
    counts: Counter[tuple[str, str]] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[classify(stack)] += int(n)
    idle = sum(n for (side, _), n in counts.items() if side == "idle")
    total = sum(counts.values()) - idle or 1
    rows = [
        {"side": s, "category": c, "samples": n, "share": round(100 * n / total, 1)}
        for (s, c), n in sorted(
            counts.items(), key=lambda kv: (["parent", "planner", "workers", "idle"].index(kv[0][0]), -kv[1])
        )
        if s != "idle"
    ]
    sides = {s: sum(n for (side, _), n in counts.items() if side == s) for s in ("parent", "planner", "workers")}
    return {"samples": total, "idle_samples": idle, "rate": RATE, "rows": rows, "sides": sides}


def render(name: str, summary: dict, meta: dict) -> str:
    lines = [
        f"## Profile shape: {name}",
        "",
        ", ".join(f"{k} {v}" for k, v in meta.items()),
        f"{summary['samples']:,} busy samples at {summary['rate']}/s "
        f"({summary['idle_samples']:,} more were waits or frameless, left out): "
        + ", ".join(f"{s} {100 * n / summary['samples']:.0f}%" for s, n in summary["sides"].items()),
        "",
        "| side | where | samples | share of busy |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['side']} | {r['category']} | {r['samples']:,} | {r['share']:.1f}% |" for r in summary["rows"]]
    return "\n".join(lines) + "\n"


def record(root: Path, job: str, data: Path, files: int, out_raw: Path) -> dict[str, object]:
    j = jobs()[job]
    work = Path(tempfile.mkdtemp(prefix="profile-"))
    env = {
        **os.environ,
        "BENCH_STATE": str(work / "state"),
        "BENCH_OUT": str(work / "out"),
        "BENCH_DATA": str(data),
        "BENCH_URLS": str(data / f"{j.prefix}-*.csv.gz"),
    }
    argv = ["py-spy", "record", "--subprocesses", "-r", str(RATE), "-f", "raw", "-o", str(out_raw), "--"]
    argv += [sys.executable, str(root / "run.py"), "--config", str(j.toml), "--full-refresh", "--quiet"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the profiled run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return {"wall s (under py-spy)": round(wall, 1), "files": files}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=("taxi", "wide"), default="wide")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--root", type=Path, default=HERE.parent, help="working copy whose run.py is profiled")
    p.add_argument("--raw", type=Path, help="only summarise this py-spy raw file")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--name", default="profile")
    args = p.parse_args(argv)
    meta: dict[str, object] = {"job": args.job, "rows": f"{args.rows:,}", "root": str(args.root)}
    raw = args.raw
    if raw is None:
        if args.job == "wide":
            from benchmarks.wide import dataset as wide_dataset

            data = wide_dataset(args.data_dir, args.rows, args.files)
        else:
            from benchmarks.run_transform import dataset

            data = dataset(args.data_dir, args.rows, args.files)
        raw = Path(tempfile.gettempdir()) / f"{args.name}.raw.txt"  # ~1 MB: kept out of the repository
        meta.update(record(args.root.resolve(), args.job, data, args.files, raw))
    summary = summarise(raw)
    text = render(args.name, summary, meta)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(text)
    (args.results / f"{args.name}.json").write_text(json.dumps({"meta": meta, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

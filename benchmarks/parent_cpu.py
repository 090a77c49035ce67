"""The parent's share of a default run's CPU, and an A/B of working copies (issue #15).

    python benchmarks/parent_cpu.py --job wide --rows 2000000 --files 4 --repeat 3 \\
        --root . --root /tmp/base --sections

Runs ``run.py --config <job> --full-refresh`` at default settings (no ``--set``) on the
job's local gzip files (no HTTP server: this is about CPU), ``--repeat`` times per
``--root``, alternating the roots (A, B, A, B, ...) so a noisy spell hits both. Per run:

* **tree CPU**: user + system of the run and every process it started (the forkserver's
  children included: this script is their subreaper), as ``benchmarks/common.measure``;
* **parent CPU**: the run's own process alone, read from ``/proc/<pid>/stat`` after it
  exits and before it is reaped (``waitid(WNOWAIT)``), so children are never mixed in.

With ``--sections`` one more run per root is instrumented: the parent's CPU per thread
(``time.thread_time``) and inside the calls that matter (Parquet encoding, spooling,
pipe send/recv, the /proc sampler, CSV cutting with gunzip), by wrapping them in a launcher
(the run itself is unchanged). Prints medians, CPU-s per million rows and each root's ratio
to the first; writes ``--results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import _children_cpu, _reap_orphans, become_subreaper, machine
from benchmarks.engines import jobs

HERE = Path(__file__).resolve().parent

# Launcher for --sections: wraps parent calls with per-thread CPU accounting, then runs the CLI.
LAUNCHER = r"""
import collections, functools, json, os, sys, threading, time
if __name__ == "__main__":
    root, out = sys.argv.pop(1), sys.argv.pop(1)
    sys.path.insert(0, root)
    acc = collections.Counter()
    local = threading.local()
    def wrap(obj, name, label):
        f = getattr(obj, name)
        @functools.wraps(f)
        def w(*a, **k):
            busy = local.__dict__.setdefault("busy", set())
            if label in busy:
                return f(*a, **k)
            busy.add(label); t = time.thread_time()
            try:
                return f(*a, **k)
            finally:
                acc[label] += time.thread_time() - t; busy.discard(label)
        setattr(obj, name, w)
    run = threading.Thread.run
    def thread_run(self):
        try:
            run(self)
        finally:
            acc["thread: " + self.name.split("_")[0].split(" ")[0].rstrip("0123456789-")] += time.thread_time()
    threading.Thread.run = thread_run
    t0 = time.process_time()
    import etl.cli
    acc["main: importing etl.cli"] = time.process_time() - t0
    import multiprocessing.connection as mc
    import pyarrow.parquet as pq
    from etl.core import stats
    from etl.read import csv_cut
    from etl.transform import executors
    from etl.write import folder
    wrap(pq.ParquetWriter, "write_table", "write: Parquet encode (ParquetWriter.write_table)")
    wrap(folder.OutputWriter, "write", "write: spool a piece (OutputWriter.write, fsync included)")
    wrap(folder.OutputWriter, "publish", "main: publish (spool removed, fsyncs, renames)")
    wrap(stats.TreeSampler, "sample", "sampler: /proc tick (TreeSampler.sample)")
    wrap(csv_cut._Cutter, "next_chunk", "read: gunzip + cut CSV (_Cutter.next_chunk)")
    wrap(executors._Slot, "run", "thread: _Slot (pipe to a worker)")
    wrap(mc.Connection, "send", "pipe: send a chunk (Connection.send)")
    wrap(mc.Connection, "recv", "pipe: receive a result (Connection.recv)")
    if hasattr(executors, "recv_message"):  # the slots' reader since 6aa7d01
        wrap(executors, "recv_message", "pipe: receive a result (recv_message)")
    sys.argv[0] = os.path.join(root, "run.py")
    try:
        code = etl.cli.main()
    finally:
        acc["thread: main"] = time.thread_time()
        r = os.times()
        acc["total (process)"] = r.user + r.system
        with open(out, "w") as f:
            json.dump(dict(acc), f)
    sys.exit(code)
"""


def one_run(root: Path, job: str, data: Path, launcher: Path | None = None) -> dict[str, object]:
    j = jobs()[job]
    work = Path(tempfile.mkdtemp(prefix="parent-cpu-"))
    env = {
        **os.environ,
        "BENCH_STATE": str(work / "state"),
        "BENCH_OUT": str(work / "out"),
        "BENCH_DATA": str(data),
        "BENCH_URLS": str(data / f"{j.prefix}-*.csv.gz"),
    }
    head = [sys.executable, str(root / "run.py")]
    if launcher is not None:
        head = [sys.executable, str(launcher), str(root), str(work / "sections.json")]
    argv = [*head, "--config", str(j.toml), "--full-refresh", "--quiet"]
    _reap_orphans(set(), timeout=10.0)
    cpu0, start = _children_cpu(), time.perf_counter()
    with open(work / "log", "w") as log:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: /proc still has it
        fields = (Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2]).split()
        parent = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        code = proc.wait()
    wall = time.perf_counter() - start
    _reap_orphans(set(), timeout=30.0)
    tree = _children_cpu() - cpu0
    if code != 0:
        raise SystemExit(f"run from {root} failed (exit {code}):\n{(work / 'log').read_text()[-3000:]}")
    result: dict[str, object] = {"tree_cpu": tree, "parent_cpu": parent, "wall": wall}
    if launcher is not None:
        result["sections"] = json.loads((work / "sections.json").read_text())
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=("taxi", "wide"), default="wide")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--root", type=Path, action="append", help="working copy to run (repeat for an A/B)")
    p.add_argument("--sections", action="store_true", help="one more instrumented run per root")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--name", default="parent-cpu")
    args = p.parse_args(argv)
    roots = [r.resolve() for r in (args.root or [HERE.parent])]
    if args.job == "wide":
        from benchmarks.wide import dataset as wide_dataset

        data = wide_dataset(args.data_dir, args.rows, args.files)
    else:
        from benchmarks.run_transform import dataset

        data = dataset(args.data_dir, args.rows, args.files)
    become_subreaper()
    runs: dict[str, list[dict[str, object]]] = {str(r): [] for r in roots}
    for i in range(args.repeat):
        for root in roots:
            r = one_run(root, args.job, data)
            runs[str(root)].append(r)
            print(f"[{i + 1}/{args.repeat}] {root}: tree {r['tree_cpu']:.2f} s, parent {r['parent_cpu']:.2f} s")
    sections: dict[str, dict[str, float]] = {}
    if args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            launcher = Path(tmp) / "launch.py"
            launcher.write_text(LAUNCHER)
            for root in roots:
                sections[str(root)] = one_run(root, args.job, data, launcher)["sections"]  # type: ignore[assignment]
    per_m = 1e6 / args.rows
    rows = []
    for root, rs in runs.items():
        tree = statistics.median(float(r["tree_cpu"]) for r in rs)  # type: ignore[arg-type]
        parent = statistics.median(float(r["parent_cpu"]) for r in rs)  # type: ignore[arg-type]
        rows.append({"root": root, "tree_cpu": tree, "parent_cpu": parent, "tree_per_m": tree * per_m})
    first = rows[0]["tree_cpu"]
    lines = [
        f"## Parent CPU: {args.job} job, {args.rows:,} rows in {args.files} gzip files, default settings",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
        + " · ".join(f"{k} {v}" for k, v in machine().items() if k in ("cpu", "cores", "python", "pyarrow")),
        f"Medians of {args.repeat} run(s) per root, alternating. Tree = user+sys of the whole process tree; "
        "parent = the run's own process.",
        "",
        "| root | tree CPU s | CPU-s / M rows | parent CPU s | parent share | tree vs first root |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['root']} | {r['tree_cpu']:.2f} | {r['tree_per_m']:.2f} | {r['parent_cpu']:.2f} | "
            f"{100 * r['parent_cpu'] / r['tree_cpu']:.0f}% | {r['tree_cpu'] / first:.2f}× |"
        )
    if sections:
        labels = sorted(
            {k for s in sections.values() for k in s}, key=lambda k: -max(s.get(k, 0.0) for s in sections.values())
        )
        lines += ["", "Parent CPU s by thread and call (one instrumented run per root; calls nest inside threads):", ""]
        lines += ["| where | " + " | ".join(Path(r).name or r for r in sections) + " |"]
        lines += ["|---|" + "---:|" * len(sections)]
        lines += [f"| {k} | " + " | ".join(f"{s.get(k, 0.0):.2f}" for s in sections.values()) + " |" for k in labels]
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(text)
    payload = {
        "job": args.job,
        "rows": args.rows,
        "files": args.files,
        "runs": runs,
        "medians": rows,
        "sections": sections,
    }
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Right-sized output files (issue 16): files written, and the run's speed, before and after.

    python benchmarks/output_files.py --rows 2000000 --files 4 --repeat 3
    python benchmarks/output_files.py --rows 8000000 --files 8 --repeat 1 \\
        --set read.chunk_rows=100000 --set 'resources.memory_limit="2GiB"'

1. Extracts the code before the change (``--baseline``, a commit; ``git archive``, nothing
   in this working tree changes) into a temp folder, unless ``--baseline-root`` names one.
2. Runs the bundled example job (``config/example.toml``) once with each version and
   counts the files it publishes.
3. Runs the transform benchmark's job (``jobs/transform.toml``: the generated trips over
   HTTP from nginx, partitioned by month) with each version, ``--repeat`` times,
   interleaved and in alternating order (new, old, old, new, …) so a slow spell on a shared
   machine hits both; each run is measured by ``benchmarks.common.measure`` (wall, CPU of
   the whole process tree, sampled peak RSS) and its output's files are counted.
4. Prints a markdown table of medians with the new/old ratios and writes
   ``--results/<name>.md`` and ``<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import REPO, become_subreaper, default_server, machine, measure, serve
from benchmarks.engines import Engine, Paths, command, jobs
from benchmarks.run_transform import dataset

BASELINE = "e190467"  # the last commit before issue 16 items 1, 2, 4 (one part per chunk and partition)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--baseline", default=BASELINE, help="commit of the code before the change")
    p.add_argument("--baseline-root", type=Path, help="a working copy of the old code (instead of --baseline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="job override for both versions")
    p.add_argument("--server", default=default_server(), choices=["nginx", "etl"])
    p.add_argument("--data-dir", type=Path, default=REPO / "benchmarks" / "data")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="output-files")
    p.add_argument("--skip-example", action="store_true", help="do not run the example job")
    p.add_argument("--timeout", type=float, default=3600.0)
    return p.parse_args(argv)


def extract(commit: str, into: Path) -> Path:
    """The tree of ``commit`` in ``into`` (git archive: read-only on this repository)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def count_files(out: Path) -> dict[str, object]:
    """Data files published (dead-letter and hidden folders aside), their sizes and rows."""
    import pyarrow.parquet as pq

    found = [p for p in out.rglob("*.parquet") if not any(s.startswith(("_", ".")) for s in p.relative_to(out).parts)]
    sizes = sorted(p.stat().st_size for p in found)
    partitions = {p.parent for p in found}
    return {
        "files": len(found),
        "partitions": len(partitions),
        "rows": sum(pq.ParquetFile(p).metadata.num_rows for p in found),
        "bytes": sum(sizes),
        "smallest": sizes[0] if sizes else 0,
        "median": int(statistics.median(sizes)) if sizes else 0,
        "largest": sizes[-1] if sizes else 0,
    }


def run_example(root: Path, work: Path) -> dict[str, object]:
    out, state = work / "example-out", work / "example-state"
    argv = [sys.executable, str(root / "run.py"), "--config", str(root / "config" / "example.toml"), "--quiet"]
    argv += ["--set", f'output.path="{out}"', "--set", f'job.state_dir="{state}"']
    m = measure(argv, cwd=root)
    if m.returncode not in (0, 3):
        raise SystemExit(f"example job failed with {root}:\n{m.output[-3000:]}")
    counted = count_files(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return counted


def run_once(engine: Engine, paths: Paths, workers: int, exclude: set[int], timeout: float) -> dict:
    for folder in (paths.out, paths.state):
        shutil.rmtree(folder, ignore_errors=True)
    argv, extra_env = command(engine, paths, workers)
    load = os.getloadavg()[0]
    m = measure(argv, env={**os.environ, **extra_env}, exclude=exclude, timeout=timeout, cwd=engine.root or REPO)
    run: dict = {"wall": m.wall, "cpu": m.cpu, "peak_rss": m.peak_rss, "returncode": m.returncode, "load_before": load}
    if m.returncode != 0:
        run["error"] = m.output[-3000:]
    else:
        run["output"] = count_files(paths.out)
    for folder in (paths.out, paths.state):
        shutil.rmtree(folder, ignore_errors=True)
    return run


def summarize(name: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    if not ok:
        return {"engine": name, "failed": True, "error": runs[-1].get("error", "")}
    return {
        "engine": name,
        "failed": False,
        "runs": len(ok),
        "wall": statistics.median(r["wall"] for r in ok),
        "walls": [round(r["wall"], 2) for r in ok],
        "cpu": statistics.median(r["cpu"] for r in ok),
        "cpus": [round(r["cpu"], 2) for r in ok],
        "peak_rss": statistics.median(r["peak_rss"] for r in ok),
        "output": ok[-1]["output"],
    }


def render(result: dict) -> str:
    a = result["args"]
    m = result["machine"]
    lines = [
        f"## Output files (issue 16): {int(a['rows']):,} rows in {a['files']} files, before and after",
        "",
        f"{result['date']} · {m.get('cpu', '')} · {m.get('cores', '')} usable cores · "
        f"baseline {result['baseline']} · overrides: {', '.join(a['overrides']) or 'none'}",
        "",
    ]
    if result.get("example"):
        lines += ["The bundled example job (`config/example.toml`), Parquet files published:", ""]
        lines += [
            "| version | files | partitions | rows | smallest | median | largest |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for version, c in result["example"].items():
            lines.append(
                f"| {version} | {c['files']} | {c['partitions']} | {c['rows']:,} | {c['smallest']:,} B "
                f"| {c['median']:,} B | {c['largest']:,} B |"
            )
        lines.append("")
    lines += [
        f"The transform benchmark's job, medians of {a['repeat']} interleaved run(s); CPU = user+sys of "
        "the whole process tree:",
        "",
        "| version | wall s | CPU s | peak RSS MiB | files | partitions | rows | median file | runs (wall s) | runs (CPU s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["results"]:
        if r["failed"]:
            lines.append(f"| {r['engine']} | failed | | | | | | | | |")
            continue
        o = r["output"]
        lines.append(
            f"| {r['engine']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['peak_rss'] / 2**20:.0f} | {o['files']:,} "
            f"| {o['partitions']} | {o['rows']:,} | {o['median'] / 2**20:.1f} MiB "
            f"| {', '.join(map(str, r['walls']))} | {', '.join(map(str, r['cpus']))} |"
        )
    if result.get("ratios"):
        q = result["ratios"]
        lines += [
            "",
            f"New / old: wall {q['wall']:.3f}, CPU {q['cpu']:.3f}, files {q['files']:.4f} "
            "(target: wall and CPU at most 1.03).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    become_subreaper()
    scratch = Path(tempfile.mkdtemp(prefix="etl-output-files-"))
    try:
        old_root = args.baseline_root.resolve() if args.baseline_root else extract(args.baseline, scratch / "old")
        new = Engine(
            "new (right-sized files)", "etl", ('transform.executor="process"', f"transform.workers={args.workers}")
        )
        old = Engine(f"old ({args.baseline_root or args.baseline})", "etl", new.overrides, root=old_root)
        example = {}
        if not args.skip_example:
            example = {new.name: run_example(REPO, scratch), old.name: run_example(old_root, scratch)}
            for version, c in example.items():
                print(f"example job, {version}: {c['files']} files, {c['rows']:,} rows", flush=True)
        data = dataset(args.data_dir, args.rows, args.files)
        server = serve(data, args.server)
        paths = Paths(data, server.url, args.files, scratch / "out", scratch / "state", args.overrides, jobs()["taxi"])
        runs: dict[str, list[dict]] = {new.name: [], old.name: []}
        try:
            for rep in range(args.repeat):
                for e in (new, old) if rep % 2 == 0 else (old, new):
                    r = run_once(e, paths, args.workers, {server.pid}, args.timeout)
                    runs[e.name].append(r)
                    status = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']})"
                    files = r.get("output", {}).get("files", "-")
                    print(
                        f"[{rep + 1}/{args.repeat}] {e.name:<28} {r['wall']:7.2f}s  cpu {r['cpu']:7.2f}s  "
                        f"rss {r['peak_rss'] / 2**20:6.0f} MiB  files {files}  load {r['load_before']:.1f}  {status}",
                        flush=True,
                    )
                    if "error" in r:
                        print(r["error"], flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [summarize(new.name, runs[new.name]), summarize(old.name, runs[old.name])]
    ratios = {}
    if not any(r["failed"] for r in rows):
        n, o = rows
        ratios = {
            "wall": n["wall"] / o["wall"],
            "cpu": n["cpu"] / o["cpu"],
            "files": n["output"]["files"] / max(o["output"]["files"], 1),
        }
    result = {
        "args": {k: (v if isinstance(v, (int, list)) else str(v)) for k, v in vars(args).items()},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "baseline": args.baseline if not args.baseline_root else str(args.baseline_root),
        "example": example,
        "results": rows,
        "ratios": ratios,
    }
    text = render(result)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(text)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Transform benchmark: this tool against plain pandas, a by-hand Pool, Dask and DuckDB.

    python benchmarks/run_transform.py --rows 8000000 --files 8 --repeat 3
    python benchmarks/run_transform.py --job wide --rows 16000000 --files 8 --repeat 3

``--job taxi`` (default) is the README's trips job (``jobs/transform.toml``); ``--job wide``
is the second job of issue #15 (``jobs/wide.toml``, data from ``benchmarks/wide.py``: 12
columns, free text, two timestamp formats, a 265-row lookup), run at default settings
against plain pandas, Dask, DuckDB and lazy Polars.

1. Generates the synthetic trips (``etl.ops.datagen``, gzipped CSV) once into
   ``--data-dir/rows<R>-files<F>/`` and reuses it on later runs.
2. Serves that folder on 127.0.0.1 with nginx (``--server nginx``, the default when it is
   installed: sendfile costs next to no CPU, as a remote server would not use this
   machine's two cores) or with this tool's own ``run.py serve`` (``--server etl``: Python,
   most of a core while sending, taken from the engines). Every engine fetches the trips
   over HTTP itself, inside its measured time (the server's own CPU is not counted);
   ``zones.csv`` is read from local disk by all.
3. Runs every engine ``--repeat`` times, interleaved (engine A, B, …, A, B, …) so a slow
   spell on this shared machine hits all of them, each as a subprocess measured by
   ``benchmarks.common.measure`` (wall, CPU of the whole process tree, sampled peak RSS).
4. Reads every output back and checks that all engines agree with plain pandas on the
   row count, the sums of fare and duration, unmatched zones and months; prints MISMATCH
   otherwise (and exits 1).
5. Prints a markdown table of medians and the issue's targets (reported, never asserted),
   and writes ``--results/<name>.md`` and ``<name>.json`` with the machine's description.

``--set KEY=VALUE`` passes job overrides to this tool's runs only (tuning:
``read.chunk_rows``, ``read.threads``, ``transform.in_flight``, ``output.writer_threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import (
    REPO,
    become_subreaper,
    default_server,
    machine,
    measure,
    parallel_ceiling,
    serve,
)
from benchmarks.engines import (
    Engine,
    Paths,
    command,
    differences,
    engines,
    etl_report,
    jobs,
)
from benchmarks.report import render, targets

HERE = Path(__file__).resolve().parent
from benchmarks.report import REFERENCE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=("taxi", "wide"), default="taxi", help="the benchmark job (see above)")
    p.add_argument("--rows", type=int, default=8_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--engines", default="", help="comma-separated name fragments (default: all)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="job override for this tool's runs, e.g. read.chunk_rows=250000",
    )
    p.add_argument(
        "--server",
        choices=("nginx", "etl"),
        default=default_server(),
        help="HTTP server for the trips: nginx (sendfile, next to no CPU; default when "
        "installed) or this tool's own `run.py serve` (Python, most of a core while sending)",
    )
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--name", default="", help="results file stem (default: transform, or wide for --job wide)")
    p.add_argument("--alt-root", type=Path, help="also run 'etl process' from this working copy (A/B)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine run")
    return p.parse_args(argv)


def dataset(data_dir: Path, rows: int, files: int) -> Path:
    """The generated trips for this size, made once (written aside, then renamed)."""
    from etl.ops.datagen import generate

    folder = data_dir / f"rows{rows}-files{files}"
    if (folder / "zones.csv").exists():  # zones.csv is written last
        return folder
    tmp = data_dir / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating {rows:,} rows in {files} files into {folder} ...", flush=True)
    started = time.perf_counter()
    generate(tmp, rows=rows, files=files)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"  done in {time.perf_counter() - started:.1f}s", flush=True)
    return folder


def selected(all_engines: list[Engine], wanted: str) -> list[Engine]:
    picked = []
    for e in all_engines:
        if wanted and not any(w.strip() and w.strip() in e.name for w in wanted.split(",")):
            continue
        if not e.available():
            print(f"skipping {e.name}: needs {', '.join(e.needs)} (pip install '.[bench]')")
            continue
        picked.append(e)
    return picked


def run_once(engine: Engine, paths: Paths, workers: int, exclude: set[int], timeout: float) -> dict:
    for folder in (paths.out, paths.state):
        shutil.rmtree(folder, ignore_errors=True)
    argv, extra_env = command(engine, paths, workers)
    load = os.getloadavg()[0]  # other work on this shared machine skews the figures: record it
    m = measure(argv, env={**os.environ, **extra_env}, exclude=exclude, timeout=timeout, cwd=engine.root or REPO)
    run: dict = {"wall": m.wall, "cpu": m.cpu, "peak_rss": m.peak_rss, "returncode": m.returncode, "load_before": load}
    if m.returncode != 0:
        run["error"] = m.output[-3000:]
    else:
        run["check"] = paths.the_job.check(paths.out)
        if engine.kind == "etl":
            run["etl"] = etl_report(paths.state)
    for folder in (paths.out, paths.state):
        shutil.rmtree(folder, ignore_errors=True)
    return run


def summarize(name: str, runs: list[dict], input_rows: int) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    if not ok:
        return {"engine": name, "failed": True, "error": runs[-1].get("error", "")}
    wall = statistics.median(r["wall"] for r in ok)
    return {
        "engine": name,
        "failed": False,
        "runs": len(ok),
        "wall": wall,
        "walls": [round(r["wall"], 2) for r in ok],
        "rows_per_s": input_rows / wall,
        "cpu": statistics.median(r["cpu"] for r in ok),
        "cpu_per_mrows": statistics.median(r["cpu"] for r in ok) / (input_rows / 1e6),  # CPU-s per M input rows
        "peak_rss": statistics.median(r["peak_rss"] for r in ok),
        "check": ok[-1]["check"],
        "etl": ok[-1].get("etl"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.name = args.name or ("wide" if args.job == "wide" else "transform")
    job = jobs()[args.job]
    become_subreaper()
    all_engines = engines(args.workers, args.job)
    if args.alt_root:
        first = all_engines[0]
        alt = Engine(f"{first.name} @ {args.alt_root.name}", "etl", first.overrides, root=args.alt_root.resolve())
        all_engines.insert(1, alt)
    chosen = selected(all_engines, args.engines)
    if args.job == "wide":
        from benchmarks.wide import dataset as wide_dataset

        data = wide_dataset(args.data_dir, args.rows, args.files)
    else:
        data = dataset(args.data_dir, args.rows, args.files)
    work = args.data_dir / "work"
    server = serve(data, args.server)
    print(f"serving {data} at {server.url} ({args.server})", flush=True)
    paths = Paths(data, server.url, args.files, work / "out", work / "state", args.overrides, job)
    ceiling = parallel_ceiling(args.workers)
    print(f"this machine runs {args.workers} CPU-bound processes {ceiling:.2f}x as fast as one", flush=True)
    runs: dict[str, list[dict]] = {e.name: [] for e in chosen}
    try:
        for rep in range(args.repeat):
            for e in chosen:
                r = run_once(e, paths, args.workers, {server.pid}, args.timeout)
                runs[e.name].append(r)
                status = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']})"
                print(
                    f"[{rep + 1}/{args.repeat}] {e.name:<24} {r['wall']:8.1f}s  cpu {r['cpu']:7.1f}s  "
                    f"rss {r['peak_rss'] / 2**20:7.0f} MiB  load {r['load_before']:.1f}  {status}  {r.get('check', '')}",
                    flush=True,
                )
                if "error" in r:
                    print(r["error"], flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = [summarize(e.name, runs[e.name], args.rows) for e in chosen]
    problems = agreement(rows)
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {**machine(), "parallel_ceiling": ceiling},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": rows,
        "targets": targets(rows, args.workers),
        "problems": problems,
    }
    text = render(result)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(text)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))
    return 1 if problems or any(r["failed"] for r in rows) else 0


def agreement(rows: list[dict]) -> list[str]:
    """MISMATCH lines: every engine's checks against the reference engine's."""
    done = [r for r in rows if not r["failed"]]
    ref = next((r for r in done if r["engine"] == REFERENCE), done[0] if done else None)
    if ref is None:
        return []
    problems = []
    for r in done:
        diff = differences(r["check"], ref["check"])
        if diff:
            problems.append(f"MISMATCH {r['engine']} vs {ref['engine']}: {'; '.join(diff)}")
    return problems


if __name__ == "__main__":
    sys.exit(main())

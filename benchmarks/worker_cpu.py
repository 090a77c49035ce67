"""CPU per phase of one worker chunk, before and after a change (issue #15, the worker side).

    python benchmarks/worker_cpu.py --baseline 4ee877a

Takes the first ``--rows`` records of each job's first data file (the wide job and the
README's taxi job, 2M-row data under ``benchmarks/data``, generated when missing) as one
CSV chunk, as a reader would cut it, and times what a worker does with it: decode
(``decode_chunk``, typed parse included), each step, and ``encode_parts`` (the write side,
shown for scale, not this script's subject), then ``run_chunk`` as a whole. CPU seconds
(user + sys of this process) per phase, ``--repeats`` times per process; the figure is
the median over every repeat of every round, in CPU-ms per million input rows.

``--baseline REV`` also measures that commit (``git archive`` into a temp folder), with
the rounds interleaved (baseline, current, baseline, ...) so a noisy host hits both alike,
and prints the ratio current / baseline. Writes ``--results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_ROWS, DATA_FILES = 2_000_000, 4  # the data set the chunk is cut from (generated once, ~200 MB)
JOBS = ("wide", "taxi")


def measure(root: Path, job: str, data: Path, rows: int, repeats: int) -> dict[str, list[float]]:
    """Per phase, the CPU seconds of each repeat; runs in a subprocess with ``root`` first on the path."""
    import gzip
    import resource

    sys.path.insert(0, str(root))
    os.environ.update(
        BENCH_STATE=tempfile.mkdtemp(), BENCH_OUT=tempfile.mkdtemp(), BENCH_DATA=str(data), BENCH_URLS="x"
    )
    from etl.core.chunks import decode_chunk
    from etl.core.config import load_job
    from etl.core.parts import encode_parts
    from etl.core.records import Chunk
    from etl.transform import steps as S
    from etl.transform import worker

    toml = HERE / "jobs" / ("wide.toml" if job == "wide" else "transform.toml")
    cfg = load_job(toml)
    first = sorted(data.glob("*.csv.gz"))[0]
    header, _, rest = gzip.open(first).read().partition(b"\n")
    body = b"\n".join(rest.split(b"\n", rows)[:rows]) + b"\n"
    columns = tuple(c.strip('"') for c in header.decode().split(","))
    chunk = Chunk(0, first.name, 0, 2, rows, body, kind="csv", columns=columns)
    worker.init_worker(worker.WorkerSpec(cfg.transform, cfg.output, cfg.read))
    t = cfg.transform
    types = S.typed_columns(t.steps)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    out: dict[str, list[float]] = {}

    def timed(name: str, fn, *a, **k):  # type: ignore[no-untyped-def]
        c = cpu()
        value = fn(*a, **k)
        out.setdefault(name, []).append(cpu() - c)
        return value

    worker.run_chunk(chunk)  # warm-up: lookup table read, expressions compiled
    for _ in range(repeats):
        c0 = cpu()
        df, _ = timed("decode", decode_chunk, chunk, cfg.read, t.on_error, types)
        c1 = cpu()
        for i, step in enumerate(t.steps):
            df, _ = timed(
                f"step {i} {step.op}",
                S.apply_steps,
                df,
                [step],
                base_dir=t.base_dir,
                on_error=t.on_error,
                label="x",
                unit="line",
            )
        out.setdefault("steps (all)", []).append(cpu() - c1)
        out.setdefault("decode + steps", []).append(cpu() - c0)
        timed("encode_parts (write side)", encode_parts, df, cfg.output, source_index=0, chunk_index=0, label="x")
        timed("run_chunk", worker.run_chunk, chunk)
    return out


def _subprocess(root: Path, job: str, data: Path, rows: int, repeats: int) -> dict[str, list[float]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", job, "--root", str(root)]
    cmd += ["--data", str(data), "--rows", str(rows), "--repeats", str(repeats)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _data(job: str, data_dir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    if job == "wide":
        from benchmarks.wide import dataset as wide_dataset

        return Path(wide_dataset(data_dir, DATA_ROWS, DATA_FILES))
    from benchmarks.run_transform import dataset

    return Path(dataset(data_dir, DATA_ROWS, DATA_FILES))


def _export(rev: str, into: Path) -> Path:
    archive = into / "base.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "base", filter="data")
    return into / "base"


def render(results: dict, meta: dict) -> str:
    lines = [
        "# Worker CPU per phase of one chunk (issue #15)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['rows']:,} rows per chunk (the first records of each job's first file), "
        f"{meta['repeats']} repeats x {meta['rounds']} rounds, medians; CPU-ms per million input rows "
        f"(user + sys of the worker process). Python {meta['python']}, {meta['cpus']} CPUs.",
        "",
        "*after* is the working tree the command ran in. decode and the steps are the worker side of "
        "issue #15 (etl/core/chunks.py, etl/transform/casts.py, steps.py, expr.py, functions.py); "
        "encode_parts is the write side, shown for scale; run_chunk is all of it, once more.",
    ]
    for job, phases in results.items():
        lines += ["", f"## {job}", ""]
        if meta["baseline"]:
            lines += [f"| phase | before ({meta['baseline']}) | after | after / before |", "|---|---:|---:|---:|"]
        else:
            lines += ["| phase | CPU-ms / M rows |", "|---|---:|"]
        for phase, figs in phases.items():
            if meta["baseline"]:
                b, a = figs.get("baseline"), figs["current"]
                ratio = f"{a / b:.2f}" if b else ""
                lines.append(f"| {phase} | {'' if b is None else f'{b:,.0f}'} | {a:,.0f} | {ratio} |")
            else:
                lines.append(f"| {phase} | {figs['current']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows in the chunk")
    p.add_argument("--repeats", type=int, default=5, help="chunks timed per process")
    p.add_argument("--rounds", type=int, default=3, help="processes per job and version (interleaved)")
    p.add_argument("--baseline", help="a git revision to measure too (before/after)")
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated: wide, taxi")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--name", default="worker-cpu")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=REPO, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.root, args.measure, args.data, args.rows, args.repeats)))
        return 0
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"current": REPO}
        if args.baseline:
            roots = {"baseline": _export(args.baseline, Path(tmp)), "current": REPO}
        raw: dict[str, dict[str, dict[str, list[float]]]] = {}
        for job in jobs:
            data = _data(job, args.data_dir)
            for _ in range(args.rounds):
                for version, root in roots.items():
                    got = _subprocess(root, job, data, args.rows, args.repeats)
                    for phase, values in got.items():
                        raw.setdefault(job, {}).setdefault(phase, {}).setdefault(version, []).extend(values)
    scale = 1e3 * 1e6 / args.rows  # CPU-s per chunk -> CPU-ms per million rows
    results = {
        job: {phase: {v: statistics.median(xs) * scale for v, xs in by.items()} for phase, by in phases.items()}
        for job, phases in raw.items()
    }
    meta = {
        "command": "python benchmarks/worker_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    text = render(results, meta)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(text)
    (args.results / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "results": results, "raw": raw}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

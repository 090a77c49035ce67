"""What taking long lines out costs JSON Lines and reader-parsed CSV (issue 18 item 2).

    python benchmarks/long_lines.py --rows 1000000 --repeat 5

Also reads past one ``--record-mib`` MiB line (gzip of zeros) in each format at
``max_record_bytes = 4MiB`` and reports the seconds and the traced Python peak (memory
bounded while skipping).

Writes one JSON Lines file and one CSV file of ``--rows`` short rows (gzipped and plain)
and times ``read_chunks`` over each (the reader thread's whole work: decompress, parse,
encode chunks), with the line filter (``etl.read.long_lines``, on for these formats under
``transform.on_error = "skip" | "quarantine"``; under ``fail`` it is off) and without it
(``_by_lines`` patched off: the code before). Prints the median
seconds of each and their ratio; writes ``benchmarks/results/long_lines.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import etl.read.formats as formats
from etl.core.config import ReadConfig
from etl.core.records import Source, StagedFile


def write(folder: Path, rows: int) -> dict[str, Path]:
    lines = [
        {"id": i, "name": f"name-{i % 977}", "fare": round(i * 0.37 % 90, 2), "flag": i % 3 == 0} for i in range(rows)
    ]
    jsonl = "".join(json.dumps(r) + "\n" for r in lines).encode()
    csv = ("id,name,fare,flag\n" + "".join(f"{r['id']},{r['name']},{r['fare']},{r['flag']}\n" for r in lines)).encode()
    out = {}
    for name, data in (("rows.jsonl", jsonl), ("rows.csv", csv)):
        (folder / name).write_bytes(data)
        (folder / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
        out[name] = folder / name
        out[f"{name}.gz"] = folder / f"{name}.gz"
    return out


def once(path: Path, filtered: bool) -> float:
    fmt = "jsonl" if ".jsonl" in path.name else "csv"
    cfg = ReadConfig(parse="reader", chunk_rows=100_000)  # type: ignore[arg-type]
    staged = StagedFile(Source(0, str(path), path.name, fmt), path, path.stat().st_size)
    original = formats._by_lines
    if not filtered:
        formats._by_lines = lambda staged, cfg: False  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        for _ in formats.read_chunks(staged, cfg, set_aside=True):
            pass
        return time.perf_counter() - start
    finally:
        formats._by_lines = original  # type: ignore[assignment]


def skip_case(folder: Path, fmt: str, record_mib: int) -> dict[str, float]:
    """One ``record_mib`` MiB line (gzip of zeros) between short rows, set aside at
    ``max_record_bytes = 4MiB``: seconds and traced Python peak while reading past it."""
    import tracemalloc

    path = folder / f"bomb.{fmt}.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"id": 1, "n": 1}\n{"id": 2, "n": "' if fmt == "jsonl" else b"id,n\n1,1\n2,")
        for _ in range(max(record_mib // 16, 1)):
            f.write(b"0" * (16 << 20))
        f.write(b'"}\n{"id": 3, "n": 3}\n' if fmt == "jsonl" else b"\n3,3\n")
    cfg = ReadConfig(parse="reader", max_record_bytes="4MiB")  # type: ignore[arg-type]
    staged = StagedFile(Source(0, str(path), path.name, fmt), path, path.stat().st_size)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        aside = sum(1 for c in formats.read_chunks(staged, cfg, set_aside=True) if c.set_aside)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert aside == 1
    return {"seconds": seconds, "peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--record-mib", type=int, default=256, help="size of the line set aside (skip cases)")
    args = ap.parse_args()
    results = []
    skips = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jsonl", "csv"):
            runs = [skip_case(Path(tmp), fmt, args.record_mib) for _ in range(args.repeat)]
            sec = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_mib"] for r in runs)
            skips.append({"format": fmt, "record_mib": args.record_mib, "seconds": sec, "peak_mib": peak})
            print(f"skip a {args.record_mib} MiB line ({fmt}.gz): {sec:.2f} s, traced peak {peak:.1f} MiB (median)")
        files = write(Path(tmp), args.rows)
        for name, path in files.items():
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeat):
                for filtered in (False, True):  # interleaved: load changes hit both alike
                    times[filtered].append(once(path, filtered))
            before, after = statistics.median(times[False]), statistics.median(times[True])
            results.append(
                {
                    "file": name,
                    "bytes": path.stat().st_size,
                    "before_s": before,
                    "after_s": after,
                    "ratio": after / before,
                }
            )
            print(
                f"{name:14} {path.stat().st_size / 2**20:8.1f} MiB  before {before:.3f} s  after {after:.3f} s  "
                f"ratio {after / before:.2f}"
            )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "long_lines.json").write_text(
        json.dumps({"rows": args.rows, "repeat": args.repeat, "results": results, "skips": skips}, indent=2)
    )
    md = ["| file | MiB | before (s, median) | after (s, median) | after / before |", "|---|---|---|---|---|"]
    md += [
        f"| {r['file']} | {r['bytes'] / 2**20:.1f} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['ratio']:.2f} |"
        for r in results
    ]
    (out / "long_lines.md").write_text(
        f"# read_chunks with and without the long-line filter\n\n`python benchmarks/long_lines.py --rows {args.rows} "
        f"--repeat {args.repeat} --record-mib {args.record_mib}`\n\n"
        + "\n".join(md)
        + "\n\n| skipped line | format | seconds (median) | traced peak MiB (median) |\n|---|---|---|---|\n"
        + "".join(
            f"| {k['record_mib']} MiB | {k['format']}.gz | {k['seconds']:.2f} | {k['peak_mib']:.1f} |\n" for k in skips
        )
    )


if __name__ == "__main__":
    main()

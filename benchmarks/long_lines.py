"""What taking long lines out costs JSON Lines and reader-parsed CSV (issue 18 item 2).

    python benchmarks/long_lines.py --rows 1000000 --repeat 5

Writes one JSON Lines file and one CSV file of ``--rows`` short rows (gzipped and plain)
and times ``read_chunks`` over each (the reader thread's whole work: decompress, parse,
encode chunks), with the line filter (``etl.read.long_lines``, now always on for these
formats) and without it (``_by_lines`` patched off: the code before). Prints the median
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
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
        json.dumps({"rows": args.rows, "repeat": args.repeat, "results": results}, indent=2)
    )
    md = ["| file | MiB | before (s, median) | after (s, median) | after / before |", "|---|---|---|---|---|"]
    md += [
        f"| {r['file']} | {r['bytes'] / 2**20:.1f} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['ratio']:.2f} |"
        for r in results
    ]
    (out / "long_lines.md").write_text(
        f"# read_chunks with and without the long-line filter\n\n`python benchmarks/long_lines.py --rows {args.rows} "
        f"--repeat {args.repeat}`\n\n" + "\n".join(md) + "\n"
    )


if __name__ == "__main__":
    main()

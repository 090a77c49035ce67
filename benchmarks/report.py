"""The transform benchmark's markdown: results table, the issue's targets, stage timings."""

from __future__ import annotations

from typing import Any

REFERENCE = "plain pandas"


def _find(rows: list[dict], prefix: str) -> dict | None:
    return next((r for r in rows if r["engine"].startswith(prefix) and not r["failed"]), None)


def targets(rows: list[dict], workers: int) -> list[dict[str, Any]]:
    """The issue's targets as measured here: figure, target, met. Reported, never asserted."""
    tool = _find(rows, f"etl process ({workers} workers)")
    one = _find(rows, "etl process (1 worker)")
    out: list[dict[str, Any]] = []
    if tool is None:
        return out

    def add(what: str, value: float, target: str, met: bool) -> None:
        out.append({"what": what, "value": round(value, 2), "target": target, "met": met})

    pandas = _find(rows, REFERENCE)
    if pandas:
        x = pandas["wall"] / tool["wall"]
        add("etl process throughput vs plain pandas", x, ">= 1.8x", x >= 1.8)
    for name in ("dask", "by-hand"):
        other = _find(rows, name)
        if other:
            x = other["wall"] / tool["wall"]
            add(f"etl process speed vs {other['engine']} (their wall / ours)", x, "> 1.0x", x > 1.0)
    duck = _find(rows, "duckdb")
    if duck:
        x = tool["wall"] / duck["wall"]
        add("etl process wall / duckdb wall", x, "<= 1.4x", x <= 1.4)
    if one:
        x = one["wall"] / tool["wall"]
        want = 0.85 * workers
        add(f"scaling end to end: 1 worker wall / {workers} workers wall", x, f">= {want:.2f}x", x >= want)
        for active, what in ((True, "from its first chunk to its last result"), (False, "from the run's start")):
            t1, tn = _transform_rate(one, active), _transform_rate(tool, active)
            if t1 and tn:
                add(
                    f"scaling of the transform stage (rows per second {what}, {workers} vs 1)",
                    tn / t1,
                    f">= {want:.2f}x",
                    tn / t1 >= want,
                )
    return out


def _transform_rate(row: dict, active: bool) -> float | None:
    """Rows per second of the transform stage; ``active``: from its first chunk (the wait
    for the first download and the first cut is the same with any worker count)."""
    etl = row.get("etl") or {}
    secs = (etl.get("stage_seconds") or {}).get("transform")
    first = etl.get("first_chunk_s") if active else 0.0
    if not secs or first is None:
        return None
    return row["check"]["rows"] / (secs - first)


SERVERS = {"nginx": "served by nginx", "etl": "served by `run.py serve`"}


def render(result: dict[str, Any]) -> str:
    rows, m = result["results"], result["machine"]
    args = result["args"]
    ref = _find(rows, REFERENCE)
    lines = [
        (
            f"## Transform benchmark: {int(args['rows']):,} rows in {args['files']} gzipped CSV files over HTTP "
            f"({SERVERS.get(args.get('server', 'etl'), args.get('server'))})"
        ),
        "",
        (
            f"{result['date']} · {m['cpu']} · {m['cores']} usable cores · {m['memory_gib']} GiB · "
            f"Python {m['python']} · pandas {m['pandas']} · pyarrow {m['pyarrow']} · numpy {m['numpy']} · "
            f"dask {m['dask']} · duckdb {m['duckdb']}"
        ),
        (
            f"Parallel ceiling: {m['cores']} CPU-bound Python processes get "
            f"{m.get('parallel_ceiling', 'n/a')}× the work of one done in the same time (ideal {m['cores']}×); "
            "no engine can scale past that here."
        ),
        f"Medians of {args['repeat']} run(s) per engine, interleaved. CPU = user+sys of the whole "
        "process tree; peak RSS = largest sum over the tree, sampled every 0.1 s. "
        f"Ratios are throughput relative to {REFERENCE} in the same run. "
        + (f"This tool's overrides: {args['overrides']}." if args["overrides"] != "[]" else ""),
        "",
        "| engine | wall s | rows/s | × pandas | CPU s | peak RSS MiB | rows out | fare sum | runs (wall s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["failed"]:
            lines.append(f"| {r['engine']} | FAILED | | | | | | | |")
            continue
        ratio = f"{ref['wall'] / r['wall']:.2f}×" if ref else "n/a"
        c = r["check"]
        lines.append(
            f"| {r['engine']} | {r['wall']:.1f} | {r['rows_per_s']:,.0f} | {ratio} | {r['cpu']:.1f} | "
            f"{r['peak_rss'] / 2**20:,.0f} | {c['rows']:,} | {c['fare_sum']:,.2f} | "
            f"{', '.join(str(w) for w in r['walls'])} |"
        )
    lines += [
        "",
        "All engines agree (rows, fare and duration sums, unmatched zones, months)."
        if not result["problems"]
        else "\n".join(f"**{p}**" for p in result["problems"]),
    ]
    if result["targets"]:
        lines += ["", "| target (issue #4) | measured | target | met |", "|---|---:|---:|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['what']} | {t['value']:.2f}× | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    lines += _stage_table(rows)
    return "\n".join(lines) + "\n"


def _stage_table(rows: list[dict]) -> list[str]:
    etl_rows = [r for r in rows if not r["failed"] and r.get("etl")]
    if not etl_rows:
        return []
    out = [
        "",
        "This tool's stages (last run; stages overlap, so they do not add up to the wall time):",
        "",
        "| engine | read s | transform s | first chunk at s | write s | worker busy s | transform starved s | chunks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in etl_rows:
        e, s = r["etl"], r["etl"]["stage_seconds"]
        first = e.get("first_chunk_s")
        out.append(
            f"| {r['engine']} | {s['read']:.1f} | {s['transform']:.1f} | "
            f"{'n/a' if first is None else f'{first:.1f}'} | {s['write']:.1f} | "
            f"{e['worker_seconds']:.1f} | {e['transform_starved_s']:.1f} | {e['chunks']} |"
        )
    return out

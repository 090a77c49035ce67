"""The gate before publishing: a run whose data fails ``[checks]`` publishes nothing.

The workers run the row checks on every chunk's output (``etl.transform.checks``) and send
back, on each ``ChunkResult``, the failing-row counts with up to 5 examples, the hashes of
the ``unique`` columns' values and the output's column types. ``Gate.add`` (writer
threads, as each result is written to the temp folder) sums the counts and spills the
hashes to the state folder, split by hash into ``UNIQUE_PARTITIONS`` files per column, so
the run-wide ``unique`` test later holds one partition in memory at a time, whatever the
run's size. ``Gate.finish`` (the loop, after every chunk is written and before
``writer.publish()``) adds the run checks (``min_rows``, ``max_rows``, ``max_rejected``,
``max_drop``, the schema contract and the ``not_empty`` guard), logs every check that
did not pass and raises ``ChecksFailed`` (exit 4) when one that is not a warning failed;
the pipeline then discards the temp folder, so the previous output stays byte-identical.

Rows counted by ``min_rows``/``max_rows``/``max_drop``/``not_empty`` are the rows the run
would publish: the whole output in ``overwrite`` mode (sources carried over unchanged
included), this run's new rows in ``append`` mode. ``max_drop`` compares them with the
previous output (``overwrite``: the manifest's published rows) or with the rows the last
successful run appended (``append``: its run report).
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from etl.core.config import ChecksConfig, JobConfig, arrow_type_name
from etl.core.errors import ChecksFailed, ETLError
from etl.core.records import MAX_CHECK_EXAMPLES, ChunkResult, Source
from etl.run.state import read_json

log = logging.getLogger("etl.checks")

# Files per unique column the hashes are spread over: the finish holds one in memory
# (32 bytes a row: 10^8 rows → 25 MiB per partition, ~3x that while sorting); more
# partitions mean more, smaller appends per chunk (each chunk appends to every one).
UNIQUE_PARTITIONS = 128
_PARTITION_SHIFT = 64 - 7  # the top 7 bits of the first hash pick one of 128 partitions
_RECORD = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("src", "<i8"), ("row", "<i8")])
SUCCESS = ("success", "success_with_rejects")


@dataclass
class _Tally:
    failed: int = 0
    examples: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    """(source index, row, example): the first rows of the run in source order."""


class Gate:
    """One run's checks: collects what the workers found, decides before publishing."""

    def __init__(self, cfg: JobConfig, run_id: str, sources: list[Source]) -> None:
        self.cfg = cfg
        self.checks = cfg.checks
        root = cfg.job_state_dir / "checks"
        shutil.rmtree(root, ignore_errors=True)  # a dead run's spill files (we hold the job lock)
        self.folder = root / run_id
        self.names = {s.index: s.name for s in sources}
        self.units: dict[int, str] = {}
        self.tallies: dict[str, _Tally] = {}
        self.unique_cols = [c for c, cc in self.checks.columns.items() if cc.unique]
        self.schemas: dict[tuple[tuple[str, str], ...], tuple[int, str]] = {}
        """Each distinct output schema seen → the first (source index, chunk label) with it."""
        self._lock = threading.Lock()
        self._spill_lock = threading.Lock()

    # ------------------------------------------------------------ writer threads

    def add(self, result: ChunkResult) -> None:
        """Take one chunk's check results (a writer thread, once the chunk is written)."""
        c = result.checks
        if c is None:
            return
        src = result.source_index
        with self._lock:
            self.units[src] = c.unit
            for name, t in c.tallies.items():
                mine = self.tallies.setdefault(name, _Tally())
                mine.failed += t.failed
                rows = [(src, int(e.get(c.unit, 0)), e) for e in t.examples]
                mine.examples = sorted(mine.examples + rows, key=lambda x: (x[0], x[1]))[:MAX_CHECK_EXAMPLES]
            if c.schema is not None and c.schema not in self.schemas:
                self.schemas[c.schema] = (src, f"{c.source_name}[chunk {result.index}]")
        if c.keys:
            with self._spill_lock:
                try:
                    for col, blob in c.keys.items():
                        self._spill(self.unique_cols.index(col), blob, src)
                except OSError as e:  # a full disk: the run fails cleanly, naming the folder
                    raise ETLError(f"cannot spill unique keys: {e}", stage="checks", item=str(self.folder)) from e

    def _spill(self, col: int, blob: bytes, src: int) -> None:
        n = len(blob) // 24
        if not n:
            return
        hashes = np.frombuffer(blob, "<u8", count=2 * n).reshape(n, 2)
        records = np.empty(n, _RECORD)
        records["h1"], records["h2"] = hashes[:, 0], hashes[:, 1]
        records["src"] = src
        records["row"] = np.frombuffer(blob, "<i8", offset=16 * n, count=n)
        part = records["h1"] >> np.uint64(_PARTITION_SHIFT)
        order = np.argsort(part, kind="stable")
        records, part = records[order], part[order]
        bounds = np.searchsorted(part, np.arange(UNIQUE_PARTITIONS + 1, dtype=np.uint64))
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in range(UNIQUE_PARTITIONS):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                with (self.folder / f"unique-{col}-{p:03d}.bin").open("ab") as f:
                    f.write(records[lo:hi].tobytes())

    # ------------------------------------------------------------------ the loop

    def finish(self, *, rows_in: int, rows_rejected: int, published_rows: int, previous_rows: int) -> dict[str, Any]:
        """Every check's result; raises ``ChecksFailed`` when one that is not a warning
        failed. ``published_rows``: what the run would publish (see the module docstring);
        ``previous_rows``: the rows of the output it would replace or add to."""
        try:
            results = self._row_results() + self._unique_results() + self._schema_results()
            results += self._run_results(rows_in, rows_rejected, published_rows, previous_rows)
        finally:
            self.discard()
        failed = [r for r in results if r["status"] == "failed"]
        for r in results:
            if r["status"] != "passed":
                level = logging.ERROR if r["status"] == "failed" else logging.WARNING
                log.log(level, "check %s", format_result(r), extra={"stage": "checks", "check": r})
        passed = sum(r["status"] == "passed" for r in results)
        if results:
            log.info(
                "checks: %d passed, %d warned, %d failed",
                passed,
                sum(r["status"] == "warned" for r in results),
                len(failed),
                extra={"stage": "checks"},
            )
        if failed:
            lines = "\n".join(f"  {format_result(r, examples=False)}" for r in failed)
            raise ChecksFailed(
                f"{len(failed)} check(s) failed; nothing was published, the previous output is unchanged:\n{lines}",
                checks=results,
            )
        return {"published_rows": published_rows, "results": results}

    def discard(self) -> None:
        """Remove this run's spill files (also when the run fails before the gate)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # ----------------------------------------------------------------- internals

    def _row_results(self) -> list[dict[str, Any]]:
        from_cfg = _row_check_warnings(self.cfg)
        out = []
        for name, key, warn in from_cfg:
            t = self.tallies.get(name, _Tally())
            out.append(
                _result(name, key, "row", t.failed > 0, warn, failed=t.failed, examples=[e for *_, e in t.examples])
            )
        return out

    def _unique_results(self) -> list[dict[str, Any]]:
        out = []
        for i, col in enumerate(self.unique_cols):
            dupes, examples = 0, list[tuple[int, int, int, int]]()
            for p in range(UNIQUE_PARTITIONS):
                path = self.folder / f"unique-{i}-{p:03d}.bin"
                if path.exists():
                    n, ex = _duplicates(np.fromfile(path, _RECORD))
                    dupes += n
                    examples = sorted(examples + ex)[:MAX_CHECK_EXAMPLES]
            shown = [self._located(s, r) | {"duplicate_of": self._located(fs, fr)} for s, r, fs, fr in examples]
            warn = "unique" in self.checks.columns[col].warn
            out.append(
                _result(
                    f"unique({col})",
                    f"checks.columns.{col}.unique",
                    "row",
                    dupes > 0,
                    warn,
                    failed=dupes,
                    examples=shown,
                )
            )
        return out

    def _located(self, src: int, row: int) -> dict[str, Any]:
        return {"file": self.names.get(src, str(src)), self.units.get(src, "row"): row}

    def _schema_results(self) -> list[dict[str, Any]]:
        contract = self.checks.schema_
        if contract is None:
            return []
        want = {k: arrow_type_name(v) for k, v in contract.columns.items()}
        drifts: list[dict[str, Any]] = []
        for schema, (_src, where) in sorted(self.schemas.items(), key=lambda kv: kv[1]):
            got = dict(schema)
            drift: dict[str, Any] = {"chunk": where}
            missing = [c for c in want if c not in got]
            extra = [c for c in got if c not in want and not contract.allow_extra]
            retyped = {c: f"{want[c]} expected, got {got[c]}" for c in want if c in got and got[c] != want[c]}
            if missing:
                drift["missing"] = missing
            if extra:
                drift["extra"] = extra
            if retyped:
                drift["types"] = retyped
            if len(drift) > 1:
                drifts.append(drift)
        n = sum(len(d.get("missing", [])) + len(d.get("extra", [])) + len(d.get("types", {})) for d in drifts)
        detail = (
            f"{len(drifts)} output schema(s) differ from checks.schema" if drifts else "output matches checks.schema"
        )
        warn = contract.on_drift == "warn"
        return [
            _result(
                "schema",
                "checks.schema",
                "schema",
                bool(drifts),
                warn,
                failed=n,
                examples=drifts[:MAX_CHECK_EXAMPLES],
                detail=detail,
            )
        ]

    def _run_results(self, rows_in: int, rejected: int, published: int, previous: int) -> list[dict[str, Any]]:
        c, out = self.checks, []
        warn = set(c.warn)
        if c.min_rows is not None:
            bad = published < c.min_rows
            out.append(
                _result(
                    "min_rows",
                    "checks.min_rows",
                    "run",
                    bad,
                    "min_rows" in warn,
                    value=published,
                    limit=c.min_rows,
                    detail=f"{published:,} rows to publish, at least {c.min_rows:,} expected",
                )
            )
        if c.max_rows is not None:
            bad = published > c.max_rows
            out.append(
                _result(
                    "max_rows",
                    "checks.max_rows",
                    "run",
                    bad,
                    "max_rows" in warn,
                    value=published,
                    limit=c.max_rows,
                    detail=f"{published:,} rows to publish, at most {c.max_rows:,} expected",
                )
            )
        if c.max_rejected is not None:
            share = rejected / rows_in if rows_in else 0.0
            bad = share > c.max_rejected
            out.append(
                _result(
                    "max_rejected",
                    "checks.max_rejected",
                    "run",
                    bad,
                    "max_rejected" in warn,
                    value=round(share, 6),
                    limit=c.max_rejected,
                    failed=rejected,
                    detail=f"{rejected:,} of {rows_in:,} rows rejected ({share:.2%}), at most {c.max_rejected:.2%} allowed",
                )
            )
        if c.max_drop is not None:
            before = self._rows_before(previous)
            drop = (before - published) / before if before else 0.0
            bad = drop > c.max_drop
            detail = (
                f"{published:,} rows against {before:,} in the last successful run ({-drop:+.2%}), a fall of at most {c.max_drop:.2%} allowed"
                if before
                else "no earlier successful run to compare with"
            )
            out.append(
                _result(
                    "max_drop",
                    "checks.max_drop",
                    "run",
                    bad,
                    "max_drop" in warn,
                    value=published,
                    limit=before,
                    detail=detail,
                )
            )
        if not c.allow_empty:
            bad = rows_in > 0 and published == 0 and previous > 0
            detail = (
                f"{rows_in:,} rows read, 0 to publish over an output of {previous:,} rows (set checks.allow_empty = true to allow it)"
                if bad
                else f"{published:,} rows to publish"
            )
            out.append(
                _result(
                    "not_empty", "checks.allow_empty", "run", bad, "not_empty" in warn, value=published, detail=detail
                )
            )
        return out

    def _rows_before(self, previous: int) -> int:
        """What ``max_drop`` compares with: the output replaced, or the last run's append."""
        if self.cfg.output.mode == "overwrite":
            return previous
        reports = self.cfg.job_state_dir / "reports"
        for path in sorted(reports.glob("run-*.json"), reverse=True):
            data = read_json(path, {})
            if data.get("status") in SUCCESS:
                return int((data.get("checks") or {}).get("published_rows", data.get("rows", {}).get("out", 0)))
        return 0


def describe_checks(cfg: ChecksConfig) -> list[str]:
    """One line per check a run will make before publishing, for ``validate``."""
    lines = []

    def add(name: str, warn: bool, what: str) -> None:
        lines.append(f"{name}{' (warn)' if warn else ''}: {what}")

    for col, c in cfg.columns.items():
        if c.not_null:
            add(f"not_null({col})", "not_null" in c.warn, "no null values")
        if c.unique:
            add(f"unique({col})", "unique" in c.warn, "no value twice in the run's output (nulls ignored)")
        if c.accepted_values is not None:
            values = ", ".join(repr(v) for v in c.accepted_values)
            add(f"accepted_values({col})", "accepted_values" in c.warn, f"one of {values} (nulls pass)")
        if c.min is not None:
            add(f"min({col})", "min" in c.warn, f">= {c.min!r} (nulls pass)")
        if c.max is not None:
            add(f"max({col})", "max" in c.warn, f"<= {c.max!r} (nulls pass)")
    for i, e in enumerate(cfg.expect):
        add(e.name or f"expect[{i}]", e.warn, f"true on every row: {e.expr}")
    if cfg.schema_ is not None:
        cols = ", ".join(f"{k} {arrow_type_name(v)}" for k, v in cfg.schema_.columns.items())
        extra = "; other columns allowed" if cfg.schema_.allow_extra else "; no other columns"
        add("schema", cfg.schema_.on_drift == "warn", f"{cols}{extra}")
    limits: dict[str, tuple[int | float | None, str]] = {
        "min_rows": (cfg.min_rows, "at least {} rows to publish"),
        "max_rows": (cfg.max_rows, "at most {} rows to publish"),
        "max_rejected": (cfg.max_rejected, "at most {} of the rows read rejected"),
        "max_drop": (cfg.max_drop, "published rows fall by at most {} against the last successful run"),
    }
    for name, (value, text) in limits.items():
        if value is not None:
            add(name, name in cfg.warn, text.format(f"{value:.0%}" if isinstance(value, float) else f"{value:,}"))
    if cfg.allow_empty:
        lines.append("not_empty: off (checks.allow_empty = true)")
    else:
        add("not_empty", "not_empty" in cfg.warn, "a run that reads rows publishes some over a non-empty output")
    return lines


def _row_check_warnings(cfg: JobConfig) -> list[tuple[str, str, bool]]:
    """(name, key, warn) of every row check except ``unique``, in config order."""
    out = []
    for col, c in cfg.checks.columns.items():
        kinds = [k for k in ("not_null", "accepted_values", "min", "max") if _set(c, k)]
        out += [(f"{k}({col})", f"checks.columns.{col}.{k}", k in c.warn) for k in kinds]
    for i, e in enumerate(cfg.checks.expect):
        out.append((e.name or f"expect[{i}]", f"checks.expect[{i}]", e.warn))
    return out


def _set(c: Any, kind: str) -> bool:
    v = getattr(c, kind)
    return bool(v) if kind == "not_null" else v is not None


def _duplicates(records: np.ndarray) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Rows whose value appeared earlier (in source order) and up to 5 of them, each with
    the first row holding the same value: (src, row, first src, first row)."""
    if len(records) < 2:
        return 0, []
    records = records[np.lexsort((records["row"], records["src"], records["h2"], records["h1"]))]
    same = (records["h1"][1:] == records["h1"][:-1]) & (records["h2"][1:] == records["h2"][:-1])
    dup_at = np.flatnonzero(same) + 1
    if not len(dup_at):
        return 0, []
    starts = np.flatnonzero(~np.r_[False, same])
    firsts = starts[np.searchsorted(starts, dup_at, side="right") - 1]
    order = np.lexsort((records["row"][dup_at], records["src"][dup_at]))[:MAX_CHECK_EXAMPLES]
    ex = [
        (
            int(records["src"][dup_at[k]]),
            int(records["row"][dup_at[k]]),
            int(records["src"][firsts[k]]),
            int(records["row"][firsts[k]]),
        )
        for k in order
    ]
    return len(dup_at), ex


def _result(name: str, key: str, kind: str, bad: bool, warn: bool, **fields: Any) -> dict[str, Any]:
    status = "passed" if not bad else "warned" if warn else "failed"
    return {"name": name, "key": key, "kind": kind, "status": status, "warn_only": warn} | fields


def format_result(r: dict[str, Any], examples: bool = True) -> str:
    """One check as a line, then its examples: what the summary, the log and the error show."""
    head = f"{r['name']} {r['status'].upper()}"
    if r.get("detail"):
        head += f": {r['detail']}"
    elif r["kind"] == "row":
        head += f": {r.get('failed', 0):,} row(s)"
    lines = [head]
    for e in r.get("examples", []) if examples else []:
        lines.append(f"    e.g. {_where(e)}")
    return "\n".join(lines)


def _where(e: dict[str, Any]) -> str:
    """``trips-0.csv line 14: fare=-1.91``, ``… duplicate of trips-2.csv line 3``, a drift."""
    if "chunk" in e:
        return "; ".join(f"{k} {v}" for k, v in e.items())
    pos = " ".join(f"{k} {v}" for k, v in e.items() if k not in ("values", "duplicate_of"))
    if "duplicate_of" in e:
        pos += " duplicate of " + " ".join(f"{k} {v}" for k, v in e["duplicate_of"].items())
    if e.get("values"):
        pos += ": " + ", ".join(f"{k}={v!r}" for k, v in e["values"].items())
    return pos


def previous_output_rows(published: dict[str, dict[str, Any]]) -> int:
    """Rows the published output holds, from the manifest's committed sources."""
    return sum(int(e.get("rows_out", 0)) for e in published.values())

"""What a run tells its operator: the end-of-run summary, the JSON run report, a metrics file.

* ``format_summary``: the few lines printed at the end of every run.
* ``write_report``: ``<state>/reports/run-<run_id>.json`` (run id, job, config hash, start,
  end, status, exit code, per-source status, rows, bytes, per-stage seconds); the last
  ``job.keep_reports`` are kept.
* ``write_metrics``: a Prometheus textfile for node_exporter's textfile collector, written
  atomically (temp file + rename in the same folder) so the collector never reads half.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from etl.core import durable
from etl.core.config import JobConfig
from etl.core.parts import REJECTS_DIR
from etl.run.state import read_json


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def parts_published(s: Any) -> int:
    """Data parts this run published: written now, carried over from the last output, or
    written by the killed run it resumed (``parts_written`` counts only the first);
    dead-letter files under ``_rejected/`` are not parts."""
    published = getattr(s, "published", None) or []
    parts = sum(1 for p in published if not p.startswith(f"{REJECTS_DIR}/"))
    return parts or int(s.parts_written)


def summary_fields(s: Any) -> dict[str, Any]:
    """The end-of-run summary as flat JSON fields (``--log-format json`` logs it as one
    object's ``summary`` key); ``s`` is a ``pipeline.RunSummary``."""
    wall = max(s.wall_seconds, 1e-9)
    stats = getattr(s, "stats", None) or {}
    results = (getattr(s, "checks", None) or {}).get("results", [])
    return {
        "run_id": s.run_id,
        "job": s.job,
        "wall_seconds": round(s.wall_seconds, 3),
        "sources": s.sources,
        "sources_skipped": getattr(s, "sources_skipped", 0),
        "files_read": s.files_read,
        "bytes_downloaded": s.bytes_downloaded,
        "bytes_read": s.bytes_read,
        "rows_in": s.rows_in,
        "rows_out": s.rows_out,
        "rows_rejected": s.rows_rejected,
        "chunks": s.chunks,
        "workers": s.workers,
        "parts_published": parts_published(s),
        "parts_written": s.parts_written,
        "stage_seconds": dict(s.stage_seconds),
        "rows_per_second": round(s.rows_in / wall, 1),
        "read_bytes_per_second": round(s.bytes_read / wall, 1),
        "peak_rss_bytes": stats.get("peak_rss_bytes"),
        "cpu_seconds": stats.get("cpu_seconds"),
        "bottleneck": (stats.get("bottleneck") or {}).get("stage"),
        "memory_held_back_seconds": (getattr(s, "memory", None) or {}).get("paused_seconds"),
        "checks": {k: [r["name"] for r in results if r["status"] == k] for k in ("warned", "failed")}
        | {"passed": sum(r["status"] == "passed" for r in results)},
    }


def format_summary(s: Any) -> str:
    """``s`` is a ``pipeline.RunSummary``."""
    wall = max(s.wall_seconds, 1e-9)
    published = parts_published(s)
    carried = f" ({s.parts_written} written by this run, {published - s.parts_written} kept from earlier runs)"
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in s.stage_seconds.items())
    lines = [
        f"run {s.run_id} of job {s.job!r}: done in {s.wall_seconds:.2f}s",
        f"  sources  {s.sources} ({getattr(s, 'sources_skipped', 0)} unchanged or resumed, {s.files_read} read, {_mib(s.bytes_downloaded)} downloaded, {_mib(s.bytes_read)} read)",
        f"  rows     {s.rows_in:,} in, {s.rows_out:,} out, {s.rows_rejected:,} rejected ({s.chunks} chunks, {s.workers} workers)",
        f"  output   {published} parts published{carried if published != s.parts_written else ''}",
        f"  stages   {stages}",
        f"  speed    {s.rows_in / wall:,.0f} rows/s, {s.bytes_read / wall / 2**20:,.1f} MiB/s read",
    ]
    lines += _checks_lines(getattr(s, "checks", None) or {})
    if getattr(s, "stats", None):
        from etl.core.stats import (
            format_stats,  # per-stage table and bottleneck (issue 7)
        )

        lines.append(format_stats(s.stats))
    return "\n".join(lines)


def _checks_lines(checks: dict[str, Any]) -> list[str]:
    """``[checks]`` in the summary: the counts, then every warned check with its examples."""
    from etl.run.checks import format_result

    results = checks.get("results", [])
    if not results:
        return []
    counts = {k: sum(r["status"] == k for r in results) for k in ("passed", "warned", "failed")}
    lines = [f"  checks   {counts['passed']} passed, {counts['warned']} warned, {counts['failed']} failed"]
    for r in results:
        if r["status"] != "passed":
            lines += ["    " + line for line in format_result(r).splitlines()]
    return lines


def config_hash(cfg: JobConfig) -> str:
    """Stable hash of the validated job: two runs with the same hash ran the same job."""
    text = cfg.model_dump_json(exclude={"file"})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunReport:
    run_id: str
    job: str
    config_hash: str
    start: float = field(default_factory=time.time)
    end: float = 0.0
    status: str = "running"
    exit_code: int | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    """``[checks]``: rows to publish and every check's result, also when they failed the run."""

    def finish(self, status: str, exit_code: int, summary: Any = None, error: BaseException | None = None) -> None:
        self.end = time.time()
        self.status = status
        self.exit_code = exit_code
        self.error = str(error) if error is not None else None
        if summary is not None:
            self.summary = asdict(summary)
            self.checks = self.summary.get("checks") or {}
        results = getattr(error, "checks", None)  # ChecksFailed: the run has no summary
        if isinstance(results, list):
            self.checks = {"results": results}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["start_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start))
        d["end_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.end))
        d["duration_seconds"] = round(self.end - self.start, 3)
        s = self.summary
        d["sources"] = s.get("per_source", [])  # index, name, status, rows in/out/rejected, parts
        d["rows"] = {k: s.get(f"rows_{k}", 0) for k in ("in", "out", "rejected")}
        d["bytes"] = {"downloaded": s.get("bytes_downloaded", 0), "read": s.get("bytes_read", 0)}
        d["stage_seconds"] = s.get("stage_seconds", {})
        return d


def write_report(report: RunReport, state_dir: Path, keep: int) -> Path:
    folder = state_dir / "reports"
    path = folder / f"run-{report.run_id}.json"
    durable.write_json(path, report.as_dict(), mode=durable.PRIVATE_MODE)  # it names sources: owner only
    for old in sorted(folder.glob("run-*.json"))[:-keep]:  # run ids start with a UTC timestamp
        old.unlink(missing_ok=True)
    return path


def last_success(state_dir: Path) -> float | None:
    """End time of the newest successful run, from the kept reports."""
    for path in sorted((state_dir / "reports").glob("run-*.json"), reverse=True):
        data = read_json(path, {})
        if data.get("status") in ("success", "success_with_rejects"):
            return float(data["end"])
    return None


def write_metrics(path: Path, report: RunReport, state_dir: Path) -> None:
    """The run's status as a Prometheus textfile (prometheus_client's registry and
    ``write_to_textfile``: a temp file in the same folder, renamed over ``path``)."""
    s = report.summary
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, ["job"], registry=registry).labels(report.job).set(value)

    gauge("etl_last_run_timestamp_seconds", "End time of the last run.", report.end)
    gauge("etl_last_success_timestamp_seconds", "End time of the last successful run.", last_success(state_dir) or 0)
    gauge("etl_run_duration_seconds", "Wall time of the last run.", report.end - report.start)
    exit_code = report.exit_code if report.exit_code is not None else -1
    gauge(
        "etl_run_exit_code", "Exit code of the last run (0 success, 3 rejected rows, 4 checks failed, ...).", exit_code
    )
    gauge("etl_run_success", "Whether the last run succeeded (1) or not (0).", int(report.status.startswith("success")))
    rows = Gauge("etl_rows", "Rows of the last run by kind.", ["job", "kind"], registry=registry)
    for kind in ("in", "out", "rejected"):
        rows.labels(report.job, kind).set(s.get(f"rows_{kind}", 0))
    gauge("etl_downloaded_bytes", "Bytes downloaded by the last run.", s.get("bytes_downloaded", 0))
    results = report.checks.get("results", [])
    if results:
        failures = Gauge(
            "etl_check_failures",
            "Failing rows (row checks) or 1 (run checks) per [checks] check of the last run; 0 when it passed.",
            ["job", "check", "severity"],
            registry=registry,
        )
        for r in results:
            failed = 0 if r["status"] == "passed" else r.get("failed") or 1
            failures.labels(report.job, r["name"], "warn" if r.get("warn_only") else "fail").set(failed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    path.chmod(0o644)  # node_exporter runs as another user; the temp file got the umask's mode


def dumps(report: RunReport) -> str:
    return json.dumps(report.as_dict(), indent=2, default=str)

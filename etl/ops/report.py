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
    if getattr(s, "stats", None):
        from etl.core.stats import (
            format_stats,  # per-stage table and bottleneck (issue 7)
        )

        lines.append(format_stats(s.stats))
    return "\n".join(lines)


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

    def finish(self, status: str, exit_code: int, summary: Any = None, error: BaseException | None = None) -> None:
        self.end = time.time()
        self.status = status
        self.exit_code = exit_code
        self.error = str(error) if error is not None else None
        if summary is not None:
            self.summary = asdict(summary)

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
    durable.write_json(path, report.as_dict())
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
    job = report.job.replace("\\", "\\\\").replace('"', '\\"')
    s = report.summary
    success = last_success(state_dir)
    lines = [
        "# HELP etl_last_run_timestamp_seconds End time of the last run.",
        "# TYPE etl_last_run_timestamp_seconds gauge",
        f'etl_last_run_timestamp_seconds{{job="{job}"}} {report.end:.3f}',
        "# HELP etl_last_success_timestamp_seconds End time of the last successful run.",
        "# TYPE etl_last_success_timestamp_seconds gauge",
        f'etl_last_success_timestamp_seconds{{job="{job}"}} {success or 0:.3f}',
        "# HELP etl_run_duration_seconds Wall time of the last run.",
        "# TYPE etl_run_duration_seconds gauge",
        f'etl_run_duration_seconds{{job="{job}"}} {report.end - report.start:.3f}',
        "# HELP etl_run_exit_code Exit code of the last run (0 success, 3 rejected rows, ...).",
        "# TYPE etl_run_exit_code gauge",
        f'etl_run_exit_code{{job="{job}"}} {report.exit_code if report.exit_code is not None else -1}',
        "# HELP etl_run_success Whether the last run succeeded (1) or not (0).",
        "# TYPE etl_run_success gauge",
        f'etl_run_success{{job="{job}"}} {int(report.status.startswith("success"))}',
        "# HELP etl_rows Rows of the last run by kind.",
        "# TYPE etl_rows gauge",
    ]
    for kind in ("in", "out", "rejected"):
        lines.append(f'etl_rows{{job="{job}",kind="{kind}"}} {s.get(f"rows_{kind}", 0)}')
    lines += [
        "# HELP etl_bytes_downloaded Bytes downloaded by the last run.",
        "# TYPE etl_bytes_downloaded gauge",
        f'etl_bytes_downloaded{{job="{job}"}} {s.get("bytes_downloaded", 0)}',
    ]
    durable.write_bytes(path, ("\n".join(lines) + "\n").encode(), mode=0o644)  # node_exporter reads it


def dumps(report: RunReport) -> str:
    return json.dumps(report.as_dict(), indent=2, default=str)

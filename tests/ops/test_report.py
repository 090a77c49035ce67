"""What a run tells its operator: the JSON run report, the Prometheus textfile, the summary."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from etl.core.config import load_job
from etl.ops.report import (
    RunReport,
    config_hash,
    format_summary,
    last_success,
    summary_fields,
    write_metrics,
    write_report,
)
from etl.run.pipeline import RunSummary

REPORT_KEYS = {
    "run_id",
    "job",
    "config_hash",
    "start",
    "end",
    "status",
    "exit_code",
    "error",
    "summary",
    "start_iso",
    "end_iso",
    "duration_seconds",
    "sources",
    "rows",
    "bytes",
    "stage_seconds",
    "checks",
}


def summary(run_id: str = "20260101T000000-aaaaaa", **kw: object) -> RunSummary:
    s = RunSummary(
        run_id=run_id,
        job="trips",
        sources=3,
        files_read=2,
        chunks=5,
        rows_in=1234,
        rows_out=1200,
        rows_rejected=34,
        bytes_downloaded=3 << 20,
        bytes_read=5 << 20,
        parts_written=5,
        wall_seconds=2.5,
        stage_seconds={"download": 0.5, "read": 1.0, "transform": 2.0, "write": 0.25},
        workers=2,
        sources_skipped=1,
        per_source=[
            {
                "index": 0,
                "name": "a.csv",
                "status": "processed",
                "rows_in": 1234,
                "rows_out": 1200,
                "rows_rejected": 34,
                "parts": 5,
            },
            {
                "index": 1,
                "name": "b.csv",
                "status": "unchanged",
                "rows_in": 0,
                "rows_out": 0,
                "rows_rejected": 0,
                "parts": 0,
            },
        ],
    )
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def finished(run_id: str, status: str = "success", code: int = 0, job: str = "trips") -> RunReport:
    r = RunReport(run_id, job, "0123456789abcdef")
    r.finish(status, code, summary(run_id))
    return r


def test_report_is_json_with_the_documented_keys(tmp_path: Path) -> None:
    r = finished("20260101T000000-aaaaaa", "success_with_rejects", 3)
    path = write_report(r, tmp_path, keep=5)
    assert path == tmp_path / "reports" / "run-20260101T000000-aaaaaa.json"
    d = json.loads(path.read_text())
    assert set(d) >= REPORT_KEYS
    assert path.stat().st_mode & 0o777 == 0o600  # it names sources: readable by the owner only
    assert (d["run_id"], d["job"], d["config_hash"], d["status"], d["exit_code"], d["error"]) == (
        "20260101T000000-aaaaaa",
        "trips",
        "0123456789abcdef",
        "success_with_rejects",
        3,
        None,
    )
    assert d["rows"] == {"in": 1234, "out": 1200, "rejected": 34}
    assert d["bytes"] == {"downloaded": 3 << 20, "read": 5 << 20}
    assert d["stage_seconds"] == {"download": 0.5, "read": 1.0, "transform": 2.0, "write": 0.25}
    assert [(s["name"], s["status"]) for s in d["sources"]] == [("a.csv", "processed"), ("b.csv", "unchanged")]
    assert d["start"] <= d["end"] and d["duration_seconds"] == round(d["end"] - d["start"], 3)
    assert d["start_iso"].endswith("Z") and d["end_iso"][:4].isdigit()


def test_a_failed_run_report_carries_the_error_text(tmp_path: Path) -> None:
    r = RunReport("20260101T000000-bbbbbb", "trips", "h")
    r.finish("failed", 1, error=RuntimeError("disk full"))
    d = json.loads(write_report(r, tmp_path, keep=3).read_text())
    assert d["status"] == "failed" and d["exit_code"] == 1 and d["error"] == "disk full"
    assert d["rows"] == {"in": 0, "out": 0, "rejected": 0} and d["sources"] == []


def test_only_the_last_keep_reports_are_kept(tmp_path: Path) -> None:
    ids = [f"2026010{d}T120000-{d:06d}" for d in range(1, 8)]
    for run_id in ids:
        write_report(finished(run_id), tmp_path, keep=3)
    kept = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert kept == [f"run-{i}.json" for i in ids[-3:]]


def test_keep_one_keeps_just_the_newest(tmp_path: Path) -> None:
    for run_id in ("20260101T000000-a", "20260102T000000-b"):
        write_report(finished(run_id), tmp_path, keep=1)
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["run-20260102T000000-b.json"]


def test_last_success_skips_failed_runs(tmp_path: Path) -> None:
    assert last_success(tmp_path) is None
    ok = finished("20260101T000000-a")
    write_report(ok, tmp_path, keep=10)
    write_report(finished("20260102T000000-b", "failed", 1), tmp_path, keep=10)
    assert last_success(tmp_path) == pytest.approx(ok.end)


def metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge"
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_textfile_parses_with_prometheus_client(tmp_path: Path) -> None:
    ok = finished("20260101T000000-a")
    write_report(ok, tmp_path, keep=10)
    r = finished("20260102T000000-b", "success_with_rejects", 3)
    path = tmp_path / "node" / "etl.prom"
    write_metrics(path, r, tmp_path)
    m = metrics(path)
    job = (("job", "trips"),)
    assert m[("etl_run_exit_code", job)] == 3
    assert m[("etl_run_success", job)] == 1
    assert m[("etl_last_success_timestamp_seconds", job)] == pytest.approx(ok.end, abs=1e-3)  # from the kept reports
    assert m[("etl_run_duration_seconds", job)] == pytest.approx(r.end - r.start, abs=1e-3)
    assert m[("etl_last_run_timestamp_seconds", job)] == pytest.approx(r.end, abs=1e-3)
    assert {k: v for k, v in m.items() if k[0] == "etl_rows"} == {
        ("etl_rows", (("job", "trips"), ("kind", "in"))): 1234,
        ("etl_rows", (("job", "trips"), ("kind", "out"))): 1200,
        ("etl_rows", (("job", "trips"), ("kind", "rejected"))): 34,
    }
    assert m[("etl_downloaded_bytes", job)] == 3 << 20
    assert not [k for k in m if k[0] == "etl_check_failures"]  # no [checks]: no series


def test_metrics_of_a_failed_run_with_no_success_yet(tmp_path: Path) -> None:
    r = RunReport("20260101T000000-a", "trips", "h")
    r.finish("failed", 1, error=ValueError("x"))
    path = tmp_path / "etl.prom"
    write_metrics(path, r, tmp_path)
    m = metrics(path)
    assert m[("etl_run_success", (("job", "trips"),))] == 0
    assert m[("etl_run_exit_code", (("job", "trips"),))] == 1
    assert m[("etl_last_success_timestamp_seconds", (("job", "trips"),))] == 0


def test_metrics_file_is_replaced_whole_and_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "etl.prom"
    path.write_text("stale\n")
    write_metrics(path, finished("20260101T000000-a"), tmp_path)
    assert "stale" not in path.read_text() and path.read_text().endswith("\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # node_exporter runs as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etl.prom"]  # no temp file left behind


def test_label_values_with_quotes_and_backslashes_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "etl.prom"
    write_metrics(path, finished("20260101T000000-a", job='we"ird\\job'), tmp_path)
    assert ("etl_run_success", (("job", 'we"ird\\job'),)) in metrics(path)


def test_summary_mentions_rows_sources_parts_and_stages() -> None:
    text = format_summary(summary())
    assert "run 20260101T000000-aaaaaa of job 'trips'" in text
    assert "1,234 in, 1,200 out, 34 rejected" in text
    assert "5 chunks, 2 workers" in text
    assert "3 (1 unchanged or resumed, 2 read, 3.0 MiB downloaded, 5.0 MiB read)" in text
    assert "5 parts published" in text
    assert "download 0.50s" in text and "write 0.25s" in text
    assert "494 rows/s" in text  # 1234 rows in 2.5 s


def test_summary_of_an_empty_run_does_not_divide_by_zero() -> None:
    text = format_summary(RunSummary(run_id="r", job="j"))
    assert "0 in, 0 out, 0 rejected" in text


def test_config_hash_is_stable_and_follows_the_job(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('[job]\nname = "j"\n[sources]\nurls = ["a.csv"]\n[output]\npath = "out"\n')
    a = config_hash(load_job(tmp_path / "job.toml"))
    assert a == config_hash(load_job(tmp_path / "job.toml")) and len(a) == 16
    assert a != config_hash(load_job(tmp_path / "job.toml", ["output.format=csv"]))


def test_summary_counts_parts_kept_from_earlier_runs() -> None:
    published = [f"zone={z}/part-{s:05d}-000000.parquet" for s in range(2) for z in range(3)]
    s = summary(parts_written=3, published=[*published, "_rejected/rejected-00000-000000.jsonl"])
    text = format_summary(s)
    assert "6 parts published (3 written by this run, 3 kept from earlier runs)" in text
    fields = summary_fields(s)
    assert fields["parts_published"] == 6 and fields["parts_written"] == 3


def test_summary_fields_are_plain_json() -> None:
    fields = summary_fields(summary())
    assert json.loads(json.dumps(fields)) == fields
    assert fields["rows_in"] == 1234 and fields["rows_rejected"] == 34 and fields["sources_skipped"] == 1
    assert fields["stage_seconds"]["transform"] == 2.0 and fields["rows_per_second"] == 493.6
    held = summary_fields(summary(memory={"budget": 1 << 30, "paused_seconds": 1.25}))
    assert held["memory_held_back_seconds"] == 1.25  # the memory guard held chunks back this long


def test_summary_and_report_list_warned_and_failed_checks() -> None:
    from etl.core.errors import ChecksFailed

    warned = {
        "name": "min(fare)",
        "key": "checks.columns.fare.min",
        "kind": "row",
        "status": "warned",
        "warn_only": True,
        "failed": 3,
        "examples": [{"file": "a.csv", "line": 7, "values": {"fare": -1.5}}],
    }
    passed = warned | {"name": "not_null(id)", "status": "passed", "warn_only": False, "failed": 0, "examples": []}
    text = format_summary(summary(checks={"published_rows": 10, "results": [warned, passed]}))
    assert "checks   1 passed, 1 warned, 0 failed" in text
    assert "min(fare) WARNED: 3 row(s)" in text and "e.g. file a.csv line 7: fare=-1.5" in text
    fields = summary_fields(summary(checks={"published_rows": 10, "results": [warned, passed]}))
    assert fields["checks"] == {"warned": ["min(fare)"], "failed": [], "passed": 1}
    r = RunReport("20260101T000000-a", "trips", "h")
    r.finish("failed", 4, error=ChecksFailed("1 check(s) failed", checks=[warned | {"status": "failed"}]))
    assert r.as_dict()["checks"]["results"][0]["status"] == "failed"

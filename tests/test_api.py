"""The public Python API: ``etl.run_job`` does what the CLI does, and ``etl`` exports a pinned set of names."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import etl
from etl.core.errors import ExitCode
from etl.run.state import JobLock

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "example.toml"


def example(tmp_path: Path, *more: str) -> list[str]:
    """Overrides that send the example job's output and state into ``tmp_path``."""
    return [f'output.path="{tmp_path / "out"}"', f'job.state_dir="{tmp_path / "state"}"', *more]


def test_the_exported_names_are_pinned() -> None:
    assert sorted(etl.__all__) == sorted(
        ["ConfigError", "ETLError", "ExitCode", "JobConfig", "RunResult", "__version__", "load_job", "run_job"]
    )
    for name in etl.__all__:
        assert getattr(etl, name) is not None
    with pytest.raises(AttributeError):
        etl.no_such_name  # noqa: B018


def test_run_job_runs_the_example_and_leaves_state_report_and_metrics(tmp_path: Path) -> None:
    metrics = tmp_path / "etl.prom"
    result = etl.run_job(EXAMPLE, overrides=example(tmp_path), metrics_file=metrics)
    assert result.exit_code == ExitCode.REJECTED_ROWS and result.status == "success_with_rejects" and result.ok
    assert result.summary is not None and result.summary.rows_in == 60_000
    rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").rglob("*.parquet"))
    assert rows == result.summary.rows_out > 0
    assert result.report is not None and json.loads(result.report.read_text())["exit_code"] == ExitCode.REJECTED_ROWS
    assert f'etl_run_exit_code{{job="example"}} {float(ExitCode.REJECTED_ROWS)}' in metrics.read_text()
    again = etl.run_job(EXAMPLE, overrides=example(tmp_path))  # the state: every source is unchanged
    assert again.exit_code == ExitCode.OK and again.summary is not None
    assert again.summary.sources_skipped == 3 and again.summary.rows_in == 0


def test_run_job_takes_a_loaded_config(tmp_path: Path) -> None:
    cfg = etl.load_job(EXAMPLE, example(tmp_path, "transform.executor=serial"))
    result = etl.run_job(cfg)
    assert result.ok and result.summary is not None and result.summary.rows_out > 0
    with pytest.raises(ValueError):
        etl.run_job(cfg, overrides=["transform.workers=1"])


def test_a_bad_job_is_exit_2_and_runs_nothing(tmp_path: Path) -> None:
    result = etl.run_job(EXAMPLE, overrides=example(tmp_path, "transform.wrokers=2"))
    assert result.exit_code == ExitCode.BAD_CONFIG and result.status == "invalid"
    assert "transform.wrokers" in str(result.error) and result.report is None
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_a_held_lock_is_exit_75_and_leaves_no_report(tmp_path: Path) -> None:
    cfg = etl.load_job(EXAMPLE, example(tmp_path))
    with JobLock(cfg.job_state_dir):
        result = etl.run_job(cfg)
    assert result.exit_code == ExitCode.LOCKED and result.status == "skipped"
    reports = cfg.job_state_dir / "reports"
    assert not reports.exists() or not list(reports.glob("*.json"))


def test_a_failed_run_is_exit_1_keeps_the_previous_output_and_reports(tmp_path: Path) -> None:
    assert etl.run_job(EXAMPLE, overrides=example(tmp_path)).ok
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    bad = example(tmp_path, 'transform.on_error="fail"')  # the sample's "n/a" fares now fail the run
    result = etl.run_job(EXAMPLE, overrides=bad, full_refresh=True)
    assert result.exit_code == ExitCode.FAILED and result.status == "failed" and not result.ok
    assert result.error is not None and "trips-00" in str(result.error)  # names the file (and line, column, value)
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert result.report is not None and json.loads(result.report.read_text())["status"] == "failed"

"""Running a job from Python: everything ``python run.py --config job.toml`` does.

``run_job(job)`` validates the job (a path to a job file, or a ``JobConfig``), takes the
job's lock, runs the pipeline, keeps the state that makes the next run resume or skip,
writes the run report (and a Prometheus textfile when asked) and returns a ``RunResult``
whose ``exit_code`` is the one the command line would exit with (see ``etl.core.errors.
ExitCode``). It does not raise for a failed run: the error is on the result, as the CLI
logs it. The CLI (``etl.cli``) is a thin layer over this function::

    from etl import run_job

    result = run_job("jobs/trips.toml", overrides=["transform.workers=2"])
    if result.exit_code not in (0, 3):
        raise SystemExit(result.error)

``handle_signals=True`` (what the CLI passes) makes SIGINT/SIGTERM stop the run cleanly
within ``job.stop_grace_seconds`` (``etl.run.stopping``); it installs process-wide signal
handlers, so a library caller running jobs in threads leaves it off.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from etl.core.config import JobConfig, load_job
from etl.core.errors import ETLError, ExitCode, Interrupted, LockHeld
from etl.ops.progress import Mode
from etl.ops.report import RunReport, config_hash, write_metrics, write_report
from etl.run.allocators import use_lean_allocators
from etl.run.pipeline import RunOptions, RunSummary, validate_job
from etl.run.pipeline import run_job as run_pipeline
from etl.run.state import JobLock
from etl.run.stopping import GracefulStop, run_with_signals

log = logging.getLogger("etl")


@dataclass
class RunResult:
    """What one run did; ``exit_code`` is the command line's for the same run."""

    exit_code: int
    status: str
    """``success``, ``success_with_rejects``, ``failed``, ``interrupted``, ``skipped``
    (another run holds the lock) or ``invalid`` (the job file or an override is wrong)."""
    run_id: str | None = None
    summary: RunSummary | None = None
    """Rows, parts, per-stage stats and the resource plan; None when the run failed."""
    error: ETLError | None = None
    report: Path | None = None
    """The run report JSON in the job's state folder (None when no run started)."""

    @property
    def ok(self) -> bool:
        return self.exit_code in (ExitCode.OK, ExitCode.REJECTED_ROWS)


def load_and_check(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Validate everything that can be checked before work starts: keys, steps, sources."""
    return validate_job(load_job(Path(path), list(overrides)))


def run_job(
    job: str | Path | JobConfig,
    overrides: Sequence[str] = (),
    *,
    full_refresh: bool = False,
    metrics_file: Path | None = None,
    progress: Mode = "off",
    handle_signals: bool = False,
    run_id: str | None = None,
) -> RunResult:
    """Run one job under its lock and leave its report behind (see the module docstring).

    ``overrides`` are ``key.path=value`` strings, as ``--set`` takes; with a ``JobConfig``
    they must be empty (apply them when loading it). ``progress``: ``off``, ``bar`` (tqdm
    bars) or ``log`` (plain periodic lines; ``etl.ops.progress``)."""
    use_lean_allocators()  # for the worker processes, and this one's if pyarrow is not loaded yet
    try:
        if isinstance(job, JobConfig):
            if overrides:
                raise ValueError("overrides apply to a job file; load the JobConfig with them instead")
            cfg = validate_job(job)
        else:
            cfg = load_and_check(job, overrides)
    except ETLError as e:
        return RunResult(e.exit_code, "invalid", error=e)
    opts = RunOptions(full_refresh=full_refresh, progress=progress)
    if run_id is not None:
        opts.run_id = run_id
    return _run(cfg, opts, metrics_file, handle_signals)


def _run(cfg: JobConfig, opts: RunOptions, metrics_file: Path | None, handle_signals: bool) -> RunResult:
    report = RunReport(opts.run_id, cfg.job.name, config_hash(cfg))
    state = cfg.job_state_dir

    def save() -> Path:
        path = write_report(report, state, cfg.job.keep_reports)
        if metrics_file:
            write_metrics(metrics_file, report, state)
        return path

    def forced(signum: int, why: str) -> None:  # at the first signal, and in the watchdog's last words
        name = signal.Signals(signum).name
        stopped = copy.copy(report)  # two threads may write it at once: neither touches the run's own
        stopped.finish("interrupted", 128 + signum, error=ETLError(f"stopped by {name}; {why}", stage="run"))
        write_report(stopped, state, cfg.job.keep_reports)
        if metrics_file:
            write_metrics(metrics_file, stopped, state)

    try:
        with JobLock(state):
            if handle_signals:
                with GracefulStop(cfg.job.stop_grace_seconds, forced) as stop:
                    summary = asyncio.run(run_with_signals(run_pipeline(cfg, opts), stop))
            else:
                summary = asyncio.run(run_pipeline(cfg, opts))
    except LockHeld as e:  # the holder writes the report; a skipped run leaves no trace to rotate
        return RunResult(e.exit_code, "skipped", opts.run_id, error=e)
    except ETLError as e:
        status = "interrupted" if isinstance(e, Interrupted) else "failed"
        report.finish(status, e.exit_code, error=e)
        return RunResult(e.exit_code, status, opts.run_id, error=e, report=save())
    except BaseException as e:  # a bug, or KeyboardInterrupt without handle_signals: still reported
        report.finish("failed", ExitCode.FAILED, error=e)
        save()
        raise
    code = ExitCode.REJECTED_ROWS if summary.rows_rejected else ExitCode.OK
    status = "success_with_rejects" if summary.rows_rejected else "success"
    report.finish(status, code, summary)
    return RunResult(code, status, opts.run_id, summary, report=save())

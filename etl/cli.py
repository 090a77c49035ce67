"""Command line: ``python run.py [run] --config job.toml`` and the helper commands.

Exit codes (also in ``--help`` and the README)::

    0    success
    1    the job failed (nothing published; the previous output is intact)
    2    bad job file, override or command-line usage
    3    success, but some rows were rejected (skipped or quarantined)
    75   skipped: another run of this job holds the lock
    130  interrupted by SIGINT;  143  interrupted by SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from etl.config import JobConfig, load_job
from etl.errors import ConfigError, ETLError, ExitCode, Interrupted, LockHeld
from etl.logs import setup_logging

log = logging.getLogger("etl")

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the job failed (nothing published; the previous output is intact)
  2    bad job file, override or command-line usage
  3    success, but some rows were rejected (skipped or quarantined)
  75   skipped: another run of this job holds the lock
  130  interrupted by SIGINT, 143 interrupted by SIGTERM
"""

COMMANDS = ("run", "validate", "generate", "serve")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_CONFIG)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run.py", description="Batch ETL: download, read, transform and write, as one job.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", required=True, type=Path, help="job file (TOML)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key, e.g. --set transform.workers=4 (repeatable)")  # fmt: skip

    r = sub.add_parser("run", help="run a job (the default command)", epilog=EXIT_CODES_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    job_args(r)
    r.add_argument("--full-refresh", action="store_true", help="ignore saved state: fetch and process every source")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bars or progress lines")
    r.add_argument("--metrics-file", type=Path, help="write a Prometheus textfile (node_exporter) here")
    r.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    r.add_argument("--log-file", type=Path, help="write logs to this file instead of stderr")

    v = sub.add_parser("validate", help="check a job file without running it")
    job_args(v)

    g = sub.add_parser("generate", help="write a deterministic synthetic trips dataset")
    g.add_argument("--rows", type=int, required=True)
    g.add_argument("--files", type=int, default=8)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--format", default="csv.gz", choices=["csv", "csv.gz", "jsonl.gz", "parquet"])
    g.add_argument("--bad-values", type=float, default=0.0, help="share of unparseable values")

    s = sub.add_parser("serve", help="serve a folder over HTTP on 127.0.0.1 (for benchmarks)")
    s.add_argument("folder", type=Path)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    s.add_argument("--bandwidth", default=None, help="bytes/s per response, e.g. 10MB")
    for sp in (r, v, g, s):
        sp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")  # `run.py --config job.toml` is `run.py run --config job.toml`
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return ExitCode.BAD_CONFIG
    setup_logging(args.log_level, getattr(args, "log_format", "text"), getattr(args, "log_file", None))
    try:
        return _dispatch(args)
    except ETLError as e:
        log.error("%s", e, exc_info=log.isEnabledFor(logging.DEBUG) and e.__cause__ is not None)
        return e.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from etl.datagen import generate

        paths = generate(args.out, rows=args.rows, files=args.files, seed=args.seed,
                         fmt=args.format, bad_values=args.bad_values)  # fmt: skip
        print(f"wrote {len(paths)} files to {args.out}")
        return ExitCode.OK
    if args.command == "serve":
        from etl.config import parse_size
        from etl.serve import run_forever

        bandwidth = parse_size(args.bandwidth) if args.bandwidth else None
        run_forever(args.folder, port=args.port, latency=args.latency, bandwidth=bandwidth)
        return ExitCode.OK
    cfg = load_and_check(args.config, args.overrides)
    if args.command == "validate":
        print(f"{args.config}: OK ({cfg.job.name})")
        return ExitCode.OK
    return run_command(cfg, args)


def load_and_check(path: Path, overrides: list[str]) -> JobConfig:
    """Validate everything that can be checked before work starts: keys, steps, sources."""
    from etl.sources import expand_sources
    from etl.steps import validate_steps

    cfg = load_job(path, overrides)
    validate_steps(cfg.transform.steps, cfg.base_dir, file=str(cfg.file))
    expand_sources(cfg)
    return cfg


def run_command(cfg: JobConfig, args: argparse.Namespace) -> int:
    """Run under the job lock; always leave a run report (and metrics file) behind."""
    from etl.pipeline import RunOptions, run_job
    from etl.progress import choose_mode
    from etl.report import RunReport, config_hash, format_summary
    from etl.state import JobLock

    opts = RunOptions(full_refresh=args.full_refresh, progress=choose_mode(args.quiet))
    setup_logging(args.log_level, args.log_format, args.log_file, run_id=opts.run_id)
    report = RunReport(opts.run_id, cfg.job.name, config_hash(cfg))
    state = cfg.job_state_dir
    try:
        with JobLock(state):
            summary = asyncio.run(_run_with_signals(run_job(cfg, opts)))
    except LockHeld as e:
        log.warning("%s", e, extra={"stage": "lock"})
        return e.exit_code  # the holder writes the report; a skipped run leaves no trace to rotate
    except ETLError as e:
        status = "interrupted" if isinstance(e, Interrupted) else "failed"
        report.finish(status, e.exit_code, error=e)
        _save(report, state, cfg, args)
        raise
    except BaseException as e:
        report.finish("failed", ExitCode.FAILED, error=e)
        _save(report, state, cfg, args)
        raise
    code = ExitCode.REJECTED_ROWS if summary.rows_rejected else ExitCode.OK
    report.finish("success_with_rejects" if summary.rows_rejected else "success", code, summary)
    _save(report, state, cfg, args)
    if args.log_file is None and args.log_format == "text":
        print(format_summary(summary), file=sys.stderr)
    else:
        log.info("%s", format_summary(summary), extra={"stage": "run"})
    return code


def _save(report: Any, state: Path, cfg: JobConfig, args: argparse.Namespace) -> None:
    from etl.report import write_metrics, write_report

    write_report(report, state, cfg.job.keep_reports)
    if args.metrics_file:
        write_metrics(args.metrics_file, report, state)


async def _run_with_signals(coro: Any) -> Any:
    """Run the job; SIGINT/SIGTERM cancel it (workers stopped, temp output discarded)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    received: list[int] = []

    def stop(signum: int) -> None:
        if not received:
            log.warning("received %s: stopping", signal.Signals(signum).name, extra={"stage": "run"})
        received.append(signum)
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


__all__ = ["main", "ConfigError"]

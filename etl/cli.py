"""Command line: ``python run.py [run] --config job.toml`` and the helper commands.

Exit codes (also in ``--help`` and the README)::

    0    success
    1    the job failed (nothing published; the previous output is intact),
         or ``validate --check-sources`` found a source that does not answer
    2    bad job file, override or command-line usage
    3    success, but some rows were rejected (skipped or quarantined)
    75   skipped: another run of this job holds the lock
    130  interrupted by SIGINT;  143  interrupted by SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from etl import __version__
from etl.core.config import JobConfig

if TYPE_CHECKING:
    from etl.core.records import Source
from etl.core.errors import ConfigError, ETLError, ExitCode
from etl.ops.logs import setup_logging
from etl.run.allocators import use_lean_allocators

log = logging.getLogger("etl")

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the job failed (nothing published; the previous output is intact),
       or validate --check-sources found a source that does not answer
  2    bad job file, override or command-line usage
  3    success, but some rows were rejected (skipped or quarantined)
  4    a [checks] check failed: nothing published, the previous output is intact
  75   skipped: another run of this job holds the lock
  130  interrupted by SIGINT, 143 interrupted by SIGTERM
"""

COMMANDS = ("run", "validate", "schema", "init", "crontab", "generate", "serve", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_CONFIG)


def build_parser(prog: str = "run.py") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Batch ETL: download, read, transform and write, as one job.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", required=True, type=Path, help="job file (TOML)")
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a job key, e.g. --set transform.workers=4 (repeatable)",
        )

    r = sub.add_parser(
        "run",
        help="run a job (the default command)",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job_args(r)
    r.add_argument("--full-refresh", action="store_true", help="ignore saved state: fetch and process every source")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bars or progress lines")
    r.add_argument("--metrics-file", type=Path, help="write a Prometheus textfile (node_exporter) here")
    r.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    r.add_argument("--log-file", type=Path, help="write logs to this file instead of stderr")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="list the sources a run would fetch, process or skip, and the output; run nothing",
    )

    v = sub.add_parser(
        "validate",
        help="check a job file without running it",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job_args(v)
    v.add_argument(
        "--check-sources",
        action="store_true",
        help="also send a HEAD request to each remote source (local ones must exist); exit 1 if any fails",
    )
    v.add_argument(
        "--explain",
        action="store_true",
        help="print every resolved setting and where it came from (default, job file, ETL__ environment, --set)",
    )

    sub.add_parser("schema", help="print the job file's JSON Schema (for editor completion and checking)")

    i = sub.add_parser("init", help="write a commented job file from the head of a source (columns, suggested casts)")
    i.add_argument("job", type=Path, help="the job file to write (TOML)")
    i.add_argument("--source", required=True, help="a local file or an http(s) URL: its first MiB is read")
    i.add_argument("--name", help="job name (default: from the source's file name)")
    i.add_argument("--force", action="store_true", help="replace an existing job file")

    c = sub.add_parser("crontab", help="check a cron schedule and print a crontab line for the job")
    job_args(c)
    c.add_argument("--schedule", required=True, help='cron expression, e.g. "0 * * * *" or @hourly')
    c.add_argument("--metrics-file", type=Path, help="pass --metrics-file PATH to the scheduled runs")

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
    for sp in (r, v, c, g, s):
        sp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    b = sub.add_parser("bench", help="run a job over a grid of settings (or --auto) and compare")  # etl/bench.py
    job_args(b)
    b.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2", help="a key and its values (repeatable)")
    b.add_argument("--repeat", type=int, default=3, help="runs per point (medians are quoted)")
    b.add_argument("--out", type=Path, help="folder for bench.csv, bench.json and plots (default ./bench-<time>)")
    b.add_argument("--include-download", action="store_true", help="fetch the sources in every run (no cache)")
    b.add_argument("--auto", action="store_true", help="search workers, chunk rows, download concurrency")
    b.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def run_and_exit(prog: str | None = None) -> NoReturn:
    """``main()``, then leave the process: the entry point of ``run.py``, ``python -m etl``
    and the ``etl`` script."""
    exit_now(main(prog=prog))


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once the exit handlers have run, skipping Python's
    own teardown: it frees every object of pandas, pyarrow and the run one at a time,
    0.15 s after the imports alone and 0.2-0.3 s after a run (measured on the 8M-row
    taxi job: 2-3% of its wall), which the OS does at once. Everything that could still
    matter runs first: the ``atexit`` handlers (logging's flush, multiprocessing's
    children) and the standard streams' flush. With a thread other than a daemon still
    alive, Python's way is kept: it waits for that thread."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head) or a closed stream: nothing left to say
            pass
    os._exit(code)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line; ``prog`` is the name usage lines show (default: how we were started)."""
    use_lean_allocators()  # before anything imports pyarrow, which picks its allocator once
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0]) or "etl"
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")  # `run.py --config job.toml` is `run.py run --config job.toml`
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return ExitCode.BAD_CONFIG
    setup_logging(
        getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"), getattr(args, "log_file", None)
    )
    try:
        return _dispatch(args)
    except ETLError as e:
        log.error("%s", e, exc_info=log.isEnabledFor(logging.DEBUG) and e.__cause__ is not None)
        return e.exit_code
    except Exception as e:  # a bug, not an input: one line for the operator, the traceback at DEBUG
        log.error(
            "internal error: %s: %s (rerun with --log-level DEBUG for the traceback, and report it)",
            type(e).__name__,
            e,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        return ExitCode.FAILED


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from etl.ops.datagen import generate

        paths = generate(
            args.out, rows=args.rows, files=args.files, seed=args.seed, fmt=args.format, bad_values=args.bad_values
        )
        print(f"wrote {len(paths)} files to {args.out}")
        return ExitCode.OK
    if args.command == "bench":
        from etl.ops.bench import bench_command

        return bench_command(args)
    if args.command == "serve":
        from etl.core.units import parse_size
        from etl.ops.serve import run_forever

        bandwidth = parse_size(args.bandwidth) if args.bandwidth else None
        run_forever(args.folder, port=args.port, latency=args.latency, bandwidth=bandwidth)
        return ExitCode.OK
    if args.command == "schema":
        import json

        from etl.core.config import json_schema

        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return ExitCode.OK
    if args.command == "init":
        from etl.ops.init import init_job

        init_job(args.job, args.source, name=args.name, force=args.force)
        load_and_check(args.job, [])  # as written, it passes validate
        print(f"wrote {args.job}; check the suggested steps, then: run.py validate --config {args.job}")
        return ExitCode.OK
    cfg = load_and_check(args.config, args.overrides, for_run=args.command == "run" and not args.dry_run)
    if args.command == "validate":
        print(f"{args.config}: OK ({cfg.job.name})")
        print_checks(cfg)
        if args.explain:
            from etl.core.config import explain, load_job_explained

            _, origins = load_job_explained(args.config, args.overrides)
            print("\n".join(explain(cfg, origins, args.config)))
        return check_sources(cfg) if args.check_sources else ExitCode.OK
    if args.command == "crontab":
        from etl.ops.cron import crontab_line

        print(crontab_line(cfg, args.config, args.schedule, args.metrics_file))
        from etl.ops.cron import env_warnings

        for line in env_warnings(args.config):
            print(line, file=sys.stderr)
        return ExitCode.OK
    if args.dry_run:
        return dry_run(cfg, args.full_refresh)
    return run_command(cfg, args)


def print_checks(cfg: JobConfig) -> None:
    """The checks a run will make before publishing (``[checks]``), one per line."""
    from etl.run.checks import describe_checks

    lines = describe_checks(cfg.checks)
    print(f"checks before publishing ({len(lines)}):")
    print("\n".join(f"  {line}" for line in lines))


def check_sources(cfg: JobConfig) -> int:
    """HEAD every remote source, stat every local one; print each failure; 1 if any failed."""
    from etl.core.redact import redact_url
    from etl.download.http import check_sources as probe_sources
    from etl.download.sources import expand_sources

    sources = expand_sources(cfg)
    problems = asyncio.run(probe_sources(cfg.download, sources))
    for src, problem in zip(sources, problems):
        if problem:
            print(f"FAILED {redact_url(src.url)}: {problem}")
    failed = sum(1 for p in problems if p)
    print(f"{len(sources) - failed} of {len(sources)} sources OK")
    return ExitCode.FAILED if failed else ExitCode.OK


def dry_run(cfg: JobConfig, full_refresh: bool) -> int:
    """Print what a run would do (per source), the output and the mode; touch nothing."""
    from etl.core.redact import redact_url
    from etl.download.sources import expand_sources
    from etl.run.commits import Commits

    sources = expand_sources(cfg)
    plan = ask_servers(cfg, sources, Commits(cfg, "dry-run", full_refresh).plan(sources))
    print(
        f"job {cfg.job.name}: {len(sources)} sources -> {cfg.output.path} "
        f"(mode {cfg.output.mode}, {cfg.output.table_format or cfg.output.format}){' [full refresh]' if full_refresh else ''}"
    )
    for src, what in zip(sources, plan):
        print(f"  {src.index:5d}  {what:<45}  {redact_url(src.url)}")
    skipped = sum(1 for w in plan if w.startswith(("skip", "resume")))
    asked = sum(1 for w in plan if w.startswith("conditional GET"))
    ask = f", {asked} to ask the server (skipped if not modified)" if asked else ""
    print(f"{len(sources) - skipped - asked} to process, {skipped} to skip{ask}; state in {cfg.job_state_dir}")
    return ExitCode.OK


def ask_servers(cfg: JobConfig, sources: list[Source], plan: list[str]) -> list[str]:
    """Where the plan says a conditional GET decides, ask now with a conditional HEAD and
    the same validators, so the dry run says what the run will do."""
    from etl.download.http import ask_not_modified
    from etl.download.source_state import SourceState, conditional_headers

    state_file = cfg.job_state_dir / "sources.json"
    asked = [i for i, what in enumerate(plan) if what.startswith("conditional GET")]
    if not asked or not state_file.exists():  # no state file: nothing to ask with (and nothing written)
        return plan
    state = SourceState.load(state_file)
    asks = []
    for i in asked:
        src = sources[i]
        asks.append(
            (src, conditional_headers(state.entries.get(state.ident(src.url)), cfg.staging_dir / src.name, src))
        )
    answers = asyncio.run(ask_not_modified(cfg.download, [(s, v) for s, v in asks if v]))
    answer = iter(answers)
    out = list(plan)
    for i, (_, validators) in zip(asked, asks):
        got = next(answer) if validators else False  # no validators: the run sends a plain GET
        how = plan[i].split("; ", 1)[1].split(" if not modified")[0]  # "skip" or "resume (...)"
        if got is True:
            out[i] = f"{how} (server: not modified)"
        elif got is False:
            out[i] = (
                "fetch; skip if the content is unchanged, else process"
                if not validators
                else "fetch and process (server: modified)"
            )
    return out


def load_and_check(path: Path, overrides: list[str], *, for_run: bool = False) -> JobConfig:
    """Validate everything that can be checked before work starts: keys, steps, sources.
    ``for_run``: a run follows; the process workers' fork server starts as soon as the job
    file says it will be needed, and imports beside the checks (``etl.core.forkserver``)."""
    from etl.core.config import load_job

    cfg = load_job(path, overrides)  # light: the job file and its typed model
    if for_run:
        from etl.run.resources import keeps_workers

        if keeps_workers(cfg):
            from etl.core.forkserver import start_early

            start_early()
    from etl.run.pipeline import validate_job  # pandas, pyarrow, the steps

    return validate_job(cfg)


def run_command(cfg: JobConfig, args: argparse.Namespace) -> int:
    """Run under the job lock (``etl.api.run_job``); print or log the summary."""
    from etl.api import run_job
    from etl.ops.progress import choose_mode
    from etl.ops.report import format_summary, summary_fields
    from etl.run.pipeline import RunOptions

    run_id = RunOptions().run_id
    setup_logging(args.log_level, args.log_format, args.log_file, run_id=run_id)
    result = run_job(
        cfg,
        full_refresh=args.full_refresh,
        metrics_file=args.metrics_file,
        progress=choose_mode(args.quiet),
        handle_signals=True,
        run_id=run_id,
    )
    if result.status == "skipped":
        err = result.error
        log.warning("%s", f"{err.item}: {err.message}" if err and err.item else err, extra={"stage": "lock"})
        return result.exit_code
    if result.error is not None:
        raise result.error
    assert result.summary is not None
    if args.log_format == "json":  # one object: the fields under "summary", a one-line message
        fields = summary_fields(result.summary)
        log.info(
            "run %s done in %.2fs: %d rows in, %d out, %d rejected; %d parts published",
            *(fields[k] for k in ("run_id", "wall_seconds", "rows_in", "rows_out", "rows_rejected")),
            fields["parts_published"],
            extra={"stage": "run", "summary": fields},
        )
    elif args.log_file is None:
        print(format_summary(result.summary), file=sys.stderr)
    else:
        log.info("%s", format_summary(result.summary), extra={"stage": "run"})
    return result.exit_code


__all__ = ["ConfigError", "main"]

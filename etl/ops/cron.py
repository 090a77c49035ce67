"""``python run.py crontab``: check a cron schedule and print a ready crontab line.

The schedule is checked as Vixie cron / cronie read it, so a typo fails here and not
silently at 3 a.m.: five fields (minute hour day-of-month month day-of-week), each a
comma list of ``*``, ``N``, ``N-M``, ``*/S`` or ``N-M/S``; month and weekday names
(``jan``, ``mon-fri``, case-insensitive); weekday 0 and 7 are both Sunday; or one of the
macros (``@hourly``, ``@daily``, ...). A small validator, not ``croniter``: cron itself
runs the schedule, so all we need is the grammar, and that is not worth a dependency.

The line runs the job the way cron needs it: absolute interpreter, script and job paths
(cron's PATH is ``/usr/bin:/bin`` and its working folder is ``$HOME``), JSON logs to
``<state>/logs/cron.log``, anything else (a crash before logging starts) appended to
``<state>/logs/cron.out``, and ``%`` escaped (cron turns a bare ``%`` into a newline).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from etl.core.config import JobConfig
from etl.core.errors import ConfigError
from etl.core.jobfile import ENV_PREFIX, env_references

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly", "@reboot")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names mapped to numbers)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {n: i + 1 for i, n in enumerate(_MONTHS)}),
    ("day of week", 0, 7, {n: i for i, n in enumerate(_DAYS)}),
)


def check_schedule(text: str) -> str:
    """The schedule, normalised to single spaces; ``ConfigError`` naming the field and rule."""
    text = text.strip()
    if text.startswith("@"):
        if text.lower() not in MACROS:
            _bad(f"unknown macro {text!r}; use one of {', '.join(MACROS)}")
        return text.lower()
    fields = text.split()
    if len(fields) != 5:
        _bad(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}: {text!r}")
    for value, spec in zip(fields, _FIELDS):
        for item in value.split(","):
            _check_item(item, *spec)
    return " ".join(fields)


def _check_item(item: str, field: str, low: int, high: int, names: dict[str, int]) -> None:
    where = f"{field} field {item!r}"
    span, slash, step = item.partition("/")
    if slash:
        if not step.isdigit() or int(step) == 0:
            _bad(f"{where}: the step after '/' must be a whole number of at least 1")
        if span != "*" and "-" not in span:
            _bad(f"{where}: a step needs '*' or a range before it (e.g. {low}-{high}/{step})")
        if int(step) > high - low + 1:
            _bad(f"{where}: step {step} is larger than the field's range {low}-{high}")
    if span == "*":
        return
    start, dash, end = span.partition("-")
    a = _value(start, where, low, high, names)
    if dash:
        b = _value(end, where, low, high, names)
        if a > b:
            _bad(f"{where}: the range runs backwards; write the smaller value first")


def _value(text: str, where: str, low: int, high: int, names: dict[str, int]) -> int:
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        hint = f" or a name ({', '.join(names)})" if names else ""
        _bad(f"{where}: {text!r} is not a number{hint}")
    if not low <= int(text) <= high:
        _bad(f"{where}: {text} is outside {low}-{high}")
    return int(text)


def _bad(message: str) -> None:
    raise ConfigError(message, key="--schedule")


def crontab_line(
    cfg: JobConfig,
    config: Path,
    schedule: str,
    metrics_file: Path | None = None,
    python: str = sys.executable,
    run_py: Path | None = None,
) -> str:
    """One crontab line for the job; creates ``<state>/logs`` so cron's redirect works."""
    schedule = check_schedule(schedule)
    run_py = run_py or Path(__file__).resolve().parents[2] / "run.py"  # etl/ops/cron.py -> the clone
    logs = cfg.job_state_dir.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = [
        str(Path(python).absolute()),
        str(run_py.resolve()),
        "run",
        "--config",
        str(config.resolve()),
        "--quiet",
        "--log-format",
        "json",
        "--log-file",
        str(logs / "cron.log"),
    ]
    if metrics_file is not None:
        argv += ["--metrics-file", str(metrics_file.resolve())]
    command = " ".join(shlex.quote(a) for a in argv) + f" >> {shlex.quote(str(logs / 'cron.out'))} 2>&1"
    return f"{schedule} {command.replace('%', chr(92) + '%')}"


def env_warnings(config: Path, environ: dict[str, str] | None = None) -> list[str]:
    """What cron's environment will lack: every ``${VAR}`` the job file uses without a
    default, and the ``ETL__…`` overrides set here; with how to provide them.

    Cron starts jobs with a near-empty environment (``HOME``, ``LOGNAME``, ``PATH``,
    ``SHELL``), not the login shell's, so a job that validates here fails there."""
    environ = dict(os.environ) if environ is None else environ
    needed: dict[str, list[str]] = {}
    for key, name, has_default in env_references(config):
        if not has_default:
            needed.setdefault(name, []).append(key)
    overrides = sorted(n for n in environ if n.upper().startswith(ENV_PREFIX))
    if not needed and not overrides:
        return []
    out = [
        f"warning: the job file uses ${{{name}}} ({', '.join(keys)}); cron's environment will not have it"
        for name, keys in sorted(needed.items())
    ]
    out += [f"warning: {name} overrides the job here; cron's environment will not have it" for name in overrides]
    names = [*sorted(needed), *overrides]
    env_file = config.resolve().with_suffix(".env")
    out += [
        "  provide them in one of two ways:",
        "  - as lines above the entry in the crontab (visible to anyone who can read it):",
        *(f"      {n}=..." for n in names),
        f"  - or, for secrets, in a file only the job's user can read ({env_file}, mode 600,",
        "    one NAME=value per line) and the entry's command prefixed with:",
        f"      set -a; . {shlex.quote(str(env_file))}; set +a;",
    ]
    return out

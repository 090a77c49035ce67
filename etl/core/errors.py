"""Every error the pipeline raises on purpose, and the exit code each one maps to.

Hierarchy::

    ETLError                    base: names the stage and the item, says retryable or not
    ├── ConfigError             bad job file, override or CLI usage       (terminal, exit 2)
    ├── SourceError             a source cannot be listed or fetched      (retryable if transient)
    │   └── ChecksumMismatch    staged bytes differ from the expected sum (retryable)
    ├── DataError               a chunk cannot be read or parsed          (terminal)
    ├── StepError               a transform step failed on a chunk        (terminal)
    ├── WorkerCrashed           a worker process died on a chunk          (retryable)
    │   └── ChunkTimeout        a chunk ran past transform.chunk_timeout  (retryable)
    ├── OutputError             output could not be written or published  (terminal)
    ├── ChecksFailed            a [checks] check failed: nothing published (exit 4)
    ├── LockHeld                another run of the same job holds the lock (exit 75)
    └── Interrupted             SIGINT / SIGTERM stopped the run          (exit 130 / 143)

Rules every class follows:

* The message states the rule that was broken and the value that broke it.
* ``stage`` and ``item`` (a source URL, ``file.csv[chunk 3, rows 600-899]``, a key path)
  are attributes, so logs and the run report can show them without parsing text.
* Instances pickle: a worker process raises them and the parent re-raises them with the
  worker's traceback kept as ``__cause__`` (see ``RemoteTraceback`` below).
"""

from __future__ import annotations

import traceback
from typing import Any


class ExitCode:
    """Process exit codes; documented in ``--help`` and the README."""

    OK = 0
    FAILED = 1  # the job failed: nothing was published, earlier output is intact
    BAD_CONFIG = 2  # bad job file, override or command-line usage
    REJECTED_ROWS = 3  # success, but some rows were skipped or quarantined
    CHECKS_FAILED = 4  # a [checks] check failed: nothing was published, earlier output is intact
    LOCKED = 75  # skipped: another run of this job is running (EX_TEMPFAIL)
    INTERRUPTED_INT = 130  # SIGINT (128 + 2)
    INTERRUPTED_TERM = 143  # SIGTERM (128 + 15)


class ETLError(Exception):
    """Base class. Raised directly only for failures with no better class."""

    retryable: bool = False
    exit_code: int = ExitCode.FAILED

    def __init__(self, message: str, *, stage: str = "", item: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.item = item

    def __str__(self) -> str:
        where = " ".join(p for p in (self.stage and f"[{self.stage}]", self.item) if p)
        return f"{where}: {self.message}" if where else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles only ``args``; keyword-only fields would be lost in transit.
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type[ETLError], message: str, state: dict[str, Any]) -> ETLError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ConfigError(ETLError):
    """The job file, a ``--set`` override or the command line is invalid.

    Raised once, at start-up, before any work starts. ``item`` is the key path
    (``transform.steps[2].expr``) and ``file`` the job file.
    """

    exit_code = ExitCode.BAD_CONFIG

    def __init__(
        self, message: str, *, key: str = "", file: str = "", problems: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message, stage="config", item=key)
        self.file = file
        self.problems = problems or [(key, message)]
        """Every (key path, message) found at once; the first is ``item`` and ``message``."""

    def __str__(self) -> str:
        if len(self.problems) > 1:
            lines = "\n".join(f"  key {k}: {m}" if k else f"  {m}" for k, m in self.problems)
            head = f"{self.file}: " if self.file else ""
            return f"{head}{len(self.problems)} problems:\n{lines}"
        where = ", ".join(p for p in (self.file, self.item and f"key {self.item}") if p)
        return f"{where}: {self.message}" if where else self.message


class SourceError(ETLError):
    """A source could not be listed, fetched or staged.

    Retryable for connection errors, timeouts, 408, 429 and 5xx; terminal for other 4xx
    and for local files that do not exist.
    """

    def __init__(
        self,
        message: str,
        *,
        item: str,
        retryable: bool = False,
        status: int | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, stage="download", item=item)
        self.retryable = retryable
        self.status = status
        self.attempts = attempts


class ChecksumMismatch(SourceError):
    """The staged bytes do not match the source's configured sha256/md5."""

    def __init__(self, message: str, *, item: str, attempts: int = 1) -> None:
        super().__init__(message, item=item, retryable=True, attempts=attempts)


class DataError(ETLError):
    """A staged file cannot be read: unknown format, broken compression, malformed rows."""

    def __init__(self, message: str, *, item: str) -> None:
        super().__init__(message, stage="read", item=item)


class StepError(ETLError):
    """A transform step raised on a chunk. ``step`` is ``transform.steps[i] (op)``."""

    def __init__(self, message: str, *, item: str, step: str = "") -> None:
        super().__init__(message, stage="transform", item=item)
        self.step = step

    def __str__(self) -> str:
        step = f" {self.step}" if self.step else ""
        return f"[transform] {self.item}{step}: {self.message}"


class WorkerCrashed(ETLError):
    """The worker process running a chunk died (a signal, the OOM killer, os._exit)."""

    retryable = True

    def __init__(self, message: str, *, item: str, signal: str = "", attempts: int = 1) -> None:
        super().__init__(message, stage="transform", item=item)
        self.signal = signal
        self.attempts = attempts


class ChunkTimeout(WorkerCrashed):
    """A chunk ran longer than ``transform.chunk_timeout``; its worker was killed (process),
    or the attempt abandoned (Dask). The thread executor's is not ``retryable``: a thread
    cannot be stopped, so the run fails at once."""


class OutputError(ETLError):
    """The output could not be written or published; the previous output is untouched."""

    def __init__(self, message: str, *, item: str) -> None:
        super().__init__(message, stage="write", item=item)


class ChecksFailed(ETLError):
    """One or more ``[checks]`` failed on this run's data; nothing was published.

    ``checks`` holds every check's result (plain dicts: ``name``, ``status``, ``failed``,
    ``examples``, ...), so the run report and the metrics can show them after the run.
    """

    exit_code = ExitCode.CHECKS_FAILED

    def __init__(self, message: str, *, checks: list[dict[str, Any]]) -> None:
        super().__init__(message, stage="checks", item="")
        self.checks = checks


class LockHeld(ETLError):
    """Another run of the same job holds its lock: this run is skipped."""

    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, *, item: str) -> None:
        super().__init__(message, stage="lock", item=item)


class Interrupted(ETLError):
    """The run was stopped by SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        import signal as _signal

        name = _signal.Signals(signum).name
        super().__init__(f"stopped by {name}", stage="run", item="")
        self.signum = signum
        self.exit_code = 128 + signum


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of the re-raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def with_remote_traceback(err: BaseException) -> BaseException:
    """Attach ``err``'s own traceback as a picklable ``__cause__`` before it leaves a worker."""
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    err.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return err

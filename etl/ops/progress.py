"""Progress per stage: tqdm bars on a terminal, plain periodic log lines otherwise.

Cron and CI capture stderr into files, where redrawn bars become walls of control
characters; so bars are drawn only when stderr is a TTY, and otherwise one plain line
per stage is logged at most every ``LOG_INTERVAL_S`` seconds. ``--quiet`` turns both off.
``update`` is thread-safe: reader and writer threads call it too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Literal

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

Mode = Literal["bar", "log", "off"]

LOG_INTERVAL_S = 10.0  # plain-line cadence: often enough to see a stall, rare enough for cron mail
log = logging.getLogger("etl.progress")


def choose_mode(quiet: bool) -> Mode:
    if quiet:
        return "off"
    return "bar" if sys.stderr.isatty() else "log"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class StageProgress:
    def __init__(self, stage: str, unit: str, total: int | None, mode: Mode, position: int) -> None:
        self.stage = stage
        self.unit = unit
        self.total = total
        self.mode = mode
        self.items = 0
        self.nbytes = 0
        self._start = time.monotonic()
        self._last_log = self._start
        self._lock = threading.Lock()
        self._bar: tqdm | None = None
        if mode == "bar":
            self._bar = tqdm(
                total=total, desc=f"{stage:<9}", unit=f" {unit}", position=position, leave=True, dynamic_ncols=True
            )

    def update(self, items: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.items += items
            self.nbytes += nbytes
            if self._bar is not None:
                if items:
                    self._bar.update(items)
                if nbytes:
                    self._bar.set_postfix_str(self._rate(), refresh=False)
            elif self.mode == "log":
                now = time.monotonic()
                if now - self._last_log >= LOG_INTERVAL_S:
                    self._last_log = now
                    log.info("%s", self.line(), extra={"stage": self.stage})

    def _rate(self) -> str:
        secs = max(time.monotonic() - self._start, 1e-9)
        return f"{_human_bytes(self.nbytes)} at {_human_bytes(self.nbytes / secs)}/s"

    def line(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        size = f", {self._rate()}" if self.nbytes else ""
        return f"{self.stage}: {self.items}{of} {self.unit}{size}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _logs_to_terminal() -> bool:
    return any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.stdout)
        for h in logging.getLogger().handlers
    )


class Progress:
    """All the bars of one run. While bars are drawn, log lines bound for the terminal go
    through ``tqdm.write`` (``logging_redirect_tqdm``), so a line never lands inside a bar."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._stages: list[StageProgress] = []
        self._redirect = contextlib.ExitStack()
        if mode == "bar" and _logs_to_terminal():  # a log file needs no redirect (it would add a handler)
            self._redirect.enter_context(logging_redirect_tqdm())

    def stage(self, name: str, unit: str, total: int | None = None) -> StageProgress:
        sp = StageProgress(name, unit, total, self.mode, position=len(self._stages))
        self._stages.append(sp)
        return sp

    def close(self) -> None:
        for sp in self._stages:
            sp.close()
        self._redirect.close()

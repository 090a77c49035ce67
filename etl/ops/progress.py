"""Progress per stage: tqdm bars on a terminal, plain periodic log lines otherwise.

Cron and CI capture stderr into files, where redrawn bars become walls of control
characters; so bars are drawn only when stderr is a TTY, and otherwise one plain line
per stage is logged at most every ``LOG_INTERVAL_S`` seconds. ``--quiet`` turns both off.
``update`` is thread-safe: reader and writer threads call it too.

The read and transform bars count bytes of the sources as stored (compressed bytes for a
``.gz``; ``Chunk.source_bytes``), so they show a percentage and an ETA: their total is the
sum of the sources' sizes, given (``expect``) as soon as the download stage knows each
(Content-Length, an object's or local file's size) or else when the file is staged, so it
may grow while downloads run; until ``settle`` says every size is known the bar says
"total so far". Their chunks (read) or rows (transform) follow the bytes. The download and write
bars count files and parts.
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


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class StageProgress:
    """One stage's bar or log line. ``by_bytes``: the bar counts ``nbytes`` against a byte
    total that ``expect`` grows; otherwise it counts items against ``total``."""

    def __init__(
        self, stage: str, unit: str, total: int | None, mode: Mode, position: int, *, by_bytes: bool = False
    ) -> None:
        self.stage = stage
        self.unit = unit
        self.total = total
        self.mode = mode
        self.by_bytes = by_bytes
        self.items = 0
        self.nbytes = 0
        self.final = not by_bytes
        """Whether the byte total is known for good (``settle``)."""
        self._start = time.monotonic()
        self._last_log = self._start
        self._lock = threading.Lock()
        self._bar: tqdm | None = None
        if mode == "bar" and by_bytes:
            self._bar = tqdm(
                total=total,
                desc=f"{stage:<9}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                position=position,
                leave=True,
                dynamic_ncols=True,
            )
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif mode == "bar":
            self._bar = tqdm(
                total=total, desc=f"{stage:<9}", unit=f" {unit}", position=position, leave=True, dynamic_ncols=True
            )

    def update(self, items: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.items += items
            self.nbytes += nbytes
            if self._bar is not None:
                if self.by_bytes:
                    if nbytes:
                        self._bar.update(nbytes)
                    if items:
                        self._bar.set_postfix_str(self._postfix(), refresh=False)
                else:
                    if items:
                        self._bar.update(items)
                    if nbytes:
                        self._bar.set_postfix_str(self._rate(), refresh=False)
            elif self.mode == "log":
                self._maybe_log()

    def expect(self, nbytes: int) -> None:
        """Grow (or, for a file that will not be read, shrink) the byte total."""
        with self._lock:
            self.total = (self.total or 0) + nbytes
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def settle(self) -> None:
        """Every size is known: the total stops growing."""
        with self._lock:
            self.final = True
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix())

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            return
        self._last_log = now
        extra: dict[str, object] = {"stage": self.stage}
        if self.by_bytes:
            extra.update(done_bytes=self.nbytes, total_bytes=self.total or 0, total_final=self.final, items=self.items)
        log.info("%s", self.line(), extra=extra)

    def _postfix(self) -> str:
        return f"{self.items:,} {self.unit}" + ("" if self.final else ", total so far: downloads running")

    def _rate(self) -> str:
        secs = max(time.monotonic() - self._start, 1e-9)
        return f"{_human_bytes(self.nbytes)} at {_human_bytes(self.nbytes / secs)}/s"

    def line(self) -> str:
        if self.by_bytes:
            return self._bytes_line()
        of = f"/{self.total}" if self.total is not None else ""
        size = f", {self._rate()}" if self.nbytes else ""
        return f"{self.stage}: {self.items}{of} {self.unit}{size}"

    def _bytes_line(self) -> str:
        """``read: 12.0 MiB of 48.0 MiB (25%, ETA 0:30), 3 chunks, at 1.2 MiB/s``."""
        total = self.total or 0
        secs = max(time.monotonic() - self._start, 1e-9)
        rate = self.nbytes / secs
        of = "" if self.final else " so far (downloads running)"
        share = f"{self.nbytes / total:.0%}" if total else "?"
        eta = f", ETA {_clock((total - self.nbytes) / rate)}" if rate > 0 and total >= self.nbytes else ""
        return (
            f"{self.stage}: {_human_bytes(self.nbytes)} of {_human_bytes(total)}{of} ({share}{eta}), "
            f"{self.items} {self.unit}, at {_human_bytes(rate)}/s"
        )

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

    def stage(self, name: str, unit: str, total: int | None = None, *, by_bytes: bool = False) -> StageProgress:
        sp = StageProgress(name, unit, total, self.mode, position=len(self._stages), by_bytes=by_bytes)
        self._stages.append(sp)
        return sp

    def close(self) -> None:
        for sp in self._stages:
            sp.close()
        self._redirect.close()

"""Stopping a run on SIGINT/SIGTERM: cleanly within ``job.stop_grace_seconds``, else by force.

``run_with_signals`` runs the job as a task that the first signal cancels (downloads
cancelled, workers stopped, committed sources kept for the next run, nothing published);
``GracefulStop`` installs the handlers and the watchdog that kills every descendant and
exits 130 / 143 when stopping takes longer than the grace, or a second signal comes.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Self

import psutil  # here, not in the force path: nothing there may wait on an import

from etl.core.errors import Interrupted

log = logging.getLogger("etl")

LAST_WORDS_SECONDS = 5.0  # after the grace, at most this long for the last log line and report
# (the first signal wrote one already): longer waits out a slow disk, shorter ends a hung one sooner


async def run_with_signals(coro: Any, stop: GracefulStop) -> Any:
    """Run the job as a task that SIGINT/SIGTERM cancel (see ``GracefulStop``): downloads
    cancelled, workers stopped, committed sources kept for the next run (etl/state.py),
    nothing published; raises ``Interrupted``."""
    task = asyncio.ensure_future(coro)
    stop.attach(asyncio.get_running_loop(), task)
    try:
        return await task
    except asyncio.CancelledError:
        if stop.received:
            raise Interrupted(stop.received[0]) from None
        raise
    finally:
        stop.detach()


class GracefulStop:
    """SIGINT/SIGTERM while a run is on: cancel it and arm a watchdog.

    The run then gets ``grace`` seconds to stop cleanly. If it takes longer, or a second
    signal comes, the watchdog kills every descendant process (fork server, workers, and
    anything a step started), writes the run report through ``on_force`` and exits at once
    with 128 + the first signal (130 / 143), like a clean stop. Nothing is published either
    way; the manifest is saved atomically, so the next run resumes from its last save.

    Plain ``signal.signal`` handlers, not ``loop.add_signal_handler``: those only run when
    the event loop turns, so a loop stuck in a blocking call would never arm the watchdog.
    The watchdog is a thread for the same reason, and it stays armed until the ``with``
    block ends, i.e. after ``asyncio.run`` has also waited for its ``to_thread`` work (a
    hung step in the memory probe, a hung disk), which a cancelled task does not wait for.

    ``on_force(signum, why)`` writes the interrupted run's report. It is called twice: as
    soon as the first signal comes (by its own thread, so the report is on disk during the
    grace, not only in the last words), and again by the last words with the reason of the
    forced stop. A clean stop writes its own report after the ``with`` block, which first
    waits for the early one. If the last words cannot finish within ``LAST_WORDS_SECONDS``,
    every thread's stack goes to stderr (faulthandler: no locks, no imports) before the exit.
    """

    def __init__(self, grace: float, on_force: Callable[[int, str], None] | None = None) -> None:
        self.grace = grace
        self.on_force = on_force
        self._early: threading.Thread | None = None  # the report written when the first signal came
        self.received: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future[Any] | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()  # the force path holds it until the process is gone
        self._done = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if self._early is not None:  # the clean stop's report must land after it; the watchdog
            self._early.join()  # is still armed, so a hung disk cannot keep the run alive
        with self._lock:  # waits for (never returns from) a force already under way
            self._done = True
            if self._timer is not None:
                self._timer.cancel()

    def attach(self, loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any]) -> None:
        self._loop, self._task = loop, task
        if self.received:  # a signal came while the run was starting
            task.cancel()

    def detach(self) -> None:
        self._task = None

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._done:
            return
        if self.received:
            self.force(self.received[0], f"received {name} again")
            return
        self.received.append(signum)
        log.warning(
            "received %s: stopping (at most %gs, job.stop_grace_seconds)", name, self.grace, extra={"stage": "run"}
        )
        late = f"stopping took longer than {self.grace:g}s (job.stop_grace_seconds)"
        self._timer = threading.Timer(self.grace, self.force, args=(signum, late))
        self._timer.daemon = True
        self._timer.start()
        if self.on_force is not None:
            stopping = f"stopping (at most {self.grace:g}s, job.stop_grace_seconds)"
            self._early = threading.Thread(
                target=self._report_early, args=(signum, stopping), name="etl-stop-report", daemon=True
            )
            self._early.start()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)  # a signal handler runs between bytecodes
            except RuntimeError:  # the loop is closed: the run is over already
                pass

    def _report_early(self, signum: int, why: str) -> None:
        assert self.on_force is not None
        try:
            self.on_force(signum, why)
        except OSError as e:  # the last words try again
            log.warning("could not write the run report: %s", e, extra={"stage": "run"})

    def force(self, signum: int, why: str) -> None:
        """Log, write the report (at most ``LAST_WORDS_SECONDS``), kill every descendant, exit."""
        with self._lock:
            if self._done:
                return  # the run ended cleanly just in time
            self._done = True
            code = 128 + signum

            def last_words() -> None:
                try:
                    log.error("%s: killing child processes and exiting with %d", why, code, extra={"stage": "run"})
                    if self.on_force is not None:
                        self.on_force(signum, why)
                finally:
                    logging.shutdown()

            # First, so that nothing runs between the kill and the exit: a run whose workers
            # vanish reacts (a relaunched resource tracker, a new pool) if given time.
            speaker = threading.Thread(target=last_words, name="etl-last-words", daemon=True)
            speaker.start()
            speaker.join(LAST_WORDS_SECONDS)
            if speaker.is_alive():  # where the last words are stuck, for whoever reads stderr
                faulthandler.dump_traceback(2, all_threads=True)  # fd 2: no Python object needed
            _kill_descendants()
            os._exit(code)


def _kill_descendants() -> int:
    """SIGKILL every descendant process, and any that appeared meanwhile; how many. No waiting:
    the process exits right after, before it can react to its workers dying."""
    killed: set[int] = set()
    for _ in range(3):  # a worker forked while a pass ran is caught by the next one
        procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in killed]
        if not procs:
            break
        for proc in procs:  # parents come before their children: the fork server dies first
            try:
                proc.kill()
                killed.add(proc.pid)
            except psutil.NoSuchProcess:
                pass
    return len(killed)

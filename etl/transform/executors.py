"""Executors: where one attempt of one chunk runs (thread, serial or process pool).

Every executor has the same contract (``Executor``): ``run(chunk)`` is one attempt of one
chunk and returns its ``ChunkResult``; a dead, killed or timed-out worker surfaces as
``WorkerCrashed`` (or ``ChunkTimeout``), and what happens next is ``etl.transform.recovery``'s
decision. ``close()`` stops every worker. The Dask executor is in ``etl.transform.distributed``.

Inter-process cost (``IpcStats``): the CPU time of the process pool's threads in the
parent (the slot threads pickle and send chunks, receive and unpickle results), read from
``/proc/self/task/<tid>/schedstat``, and the bytes sent and received.

Failures (issue 21). The process executor owns its workers: each has one pipe of its own
and one parent thread (``_Slot``), so a worker killed at any moment (receiving a chunk,
running it, sending the result, idle) fails only the chunk it held, as ``WorkerCrashed``
naming the signal; a chunk past ``chunk_timeout`` gets its worker killed and fails as
``ChunkTimeout``. The slot starts a new worker for its next chunk. Nothing is shared
between workers, so no death can stall or wedge the others (see ``ProcessExecutor``).
A pool that cannot start workers at all (``MAX_START_FAILURES`` in a row: the fork server
killed again and again) fails every chunk queued or in flight with one error (exit 1)
naming them all, the first ``MAX_NAMED_CHUNKS`` and a count, so none waits for a worker.

The thread (and serial) executor cannot kill a thread: a chunk past ``chunk_timeout``
fails the run at once with a ``ChunkTimeout`` that is not retryable (exit 1, naming the
chunk), and its thread, a daemon, is left behind, so the process still exits promptly
(see ``ThreadExecutor``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import queue
import select
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol, cast

from etl.core import forkserver
from etl.core.errors import ChunkTimeout, ETLError, RemoteTraceback, WorkerCrashed
from etl.core.records import RESULT_COUNTERS, Chunk, ChunkResult
from etl.transform.worker import READY, WorkerSpec, init_worker, recv_message, run_chunk, send_chunk, serve

log = logging.getLogger("etl.transform")

# Workers in a row that may die before saying READY: more means they die by design (a
# broken initializer, an impossible memory limit), and retrying only burns time.
MAX_START_FAILURES = 5
# Seconds a new worker may take to start (fork server, imports, spec) before it counts as
# failed: long enough for a cold, loaded machine; short enough that a wedge is noticed.
WORKER_START_TIMEOUT = 60.0
# Seconds before starting again after a failed start, doubled per failure in a row up to
# the max (0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s before giving up): enough for a killed fork
# server to be reaped and replaced, short enough not to stall the run.
START_BACKOFF = 0.1
START_BACKOFF_MAX = 2.0
# Seconds to wait for a stopped worker to exit before SIGKILL (and for a dead one's exit
# status): short, as nothing of value is lost; long enough for the fork server to report.
WORKER_EXIT_GRACE = 3.0
# Chunks a broken pool's error names one by one; beyond, a count: enough to find them in
# the log, short enough that the error stays one readable line.
MAX_NAMED_CHUNKS = 10
# Seconds close() waits for a thread past its chunk's chunk_timeout deadline before leaving
# it behind: enough for a chunk that was just finishing; a thread that is done stops at once.
THREAD_STOP_GRACE = 1.0


@dataclass
class TransformStats:
    chunks: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    retries: int = 0
    splits: int = 0
    """Chunks (or halves) retried as two halves after their worker was SIGKILLed."""
    pieces_set_aside: int = 0
    """Chunks (or halves) that crashed on every attempt and went to the dead-letter output."""
    stalls: int = 0
    """Times the stall watchdog found chunks in flight with no worker on them, and resubmitted them."""
    longest_quiet_seconds: float = 0.0
    """Longest time chunks were in flight and no attempt started or ended (a stall's length)."""
    worker_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps_seconds: float = 0.0
    encode_seconds: float = 0.0
    wall_seconds: float = 0.0
    ipc_seconds: float = 0.0
    """Parent CPU time spent sending chunks and receiving results (see the module docstring)."""
    ipc_bytes_sent: int = 0
    ipc_bytes_received: int = 0
    ipc_share: float = 0.0
    """``ipc_seconds`` over the stage's wall time: the target is below 0.10."""

    def add(self, result: ChunkResult) -> None:
        for name in RESULT_COUNTERS:
            mine = "worker_seconds" if name == "seconds" else name
            setattr(self, mine, getattr(self, mine) + getattr(result, name))

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class IpcStats:
    """Parent-side cost of moving chunks to workers and results back."""

    seconds: float = 0.0
    """CPU seconds of the pool's threads in the parent (pickle, send, receive, unpickle)."""
    bytes_sent: int = 0
    bytes_received: int = 0


class RunsChunks(Protocol):
    """What the dispatcher and the recovery runner need: an ``Executor``, or a wrapper of one
    (``etl.core.stats.MeteredExecutor``)."""

    workers: int

    async def run(self, chunk: Chunk) -> ChunkResult: ...

    def close(self) -> None: ...


class Executor(ABC):
    """Runs one attempt of one chunk. Crashes surface as ``WorkerCrashed``."""

    workers: int

    @abstractmethod
    async def run(self, chunk: Chunk) -> ChunkResult: ...

    @abstractmethod
    def close(self) -> None:
        """Stop every worker now; pending chunks are abandoned."""

    def ipc_stats(self) -> IpcStats:
        """In-process executors move no bytes between processes."""
        return IpcStats()

    @abstractmethod
    def busy(self) -> int:
        """Chunks a worker is on now (the stall watchdog's "workers idle" is 0). May block
        briefly (Dask asks its scheduler): call it off the event loop."""


class ThreadExecutor(Executor):
    """Chunks on threads of this process; ``serial`` is this with one thread (the reference).

    ``timeout`` (``transform.chunk_timeout``): a thread cannot be killed, so a chunk that
    runs past it cannot be stopped or retried in this process. Its attempt fails at once
    with a ``ChunkTimeout`` that is not retryable (the run fails, exit 1, naming the chunk),
    and the thread is abandoned: the threads are daemons that ``close()`` does not wait for
    past a chunk's deadline, so a chunk stuck for good never keeps the run's process from
    exiting. The clock starts when a thread takes the chunk, not while it is queued.
    """

    def __init__(self, spec: WorkerSpec, workers: int, timeout: float | None = None) -> None:
        self.workers = workers
        self._timeout = timeout
        init_worker(spec)
        # Unbounded by type, bounded in use: the dispatcher submits at most in_flight chunks.
        self._tasks: queue.SimpleQueue[_ThreadTask | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [_ChunkThread(self._tasks, n) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    async def run(self, chunk: Chunk) -> ChunkResult:
        if self._closed:
            raise RuntimeError("the thread executor is closed")
        loop = asyncio.get_running_loop()
        future: concurrent.futures.Future[ChunkResult] = concurrent.futures.Future()
        running = asyncio.wrap_future(future)
        if self._timeout is None:
            self._tasks.put(_ThreadTask(chunk, future, None))
            return await running
        timeout = self._timeout
        holder: _ChunkThread | None = None
        try:
            async with asyncio.timeout(None) as deadline:

                def arm() -> None:  # on the loop, as a thread takes the chunk
                    if not running.done():  # still awaited: the ``with`` has not ended
                        deadline.reschedule(loop.time() + timeout)

                self._tasks.put(_ThreadTask(chunk, future, functools.partial(loop.call_soon_threadsafe, arm)))
                return await running
        except TimeoutError:
            if not deadline.expired():  # a step's own TimeoutError
                raise
            holder = next((t for t in self._threads if t.holding is chunk), None)
            if holder is not None:
                holder.abandoned = True
        log.warning(
            "%s: still running after transform.chunk_timeout = %ss; its thread %s is left behind",
            chunk.label,
            timeout,
            holder.name if holder is not None else "?",
            extra={"stage": "transform", "source": chunk.source_name},
        )
        error = ChunkTimeout(
            f"chunk ran longer than transform.chunk_timeout = {timeout}s; the thread executor cannot "
            "interrupt a running chunk, so it is not retried and the run stops (its thread is left "
            'behind). With transform.executor = "process" a chunk past the timeout is killed and '
            "retried (as two halves after an out-of-memory kill)",
            item=chunk.label,
            signal="timeout (a thread cannot be stopped)",
        )
        error.retryable = False
        raise error

    def busy(self) -> int:
        return sum(thread.holding is not None for thread in self._threads)

    def close(self) -> None:
        """Abandon queued chunks and stop the threads: wait for a running chunk (until its
        ``chunk_timeout`` deadline, if one is set), never for one past it."""
        if self._closed:
            return
        self._closed = True
        while True:  # chunks no thread took: abandoned
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task.future.cancel()
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            if thread.abandoned:
                continue
            if self._timeout is None:
                thread.join()
                continue
            started = thread.started
            deadline = (started if started is not None else time.monotonic()) + self._timeout
            thread.join(max(0.0, deadline - time.monotonic()) + THREAD_STOP_GRACE)
            if thread.is_alive():
                thread.abandoned = True
                log.warning(
                    "transform thread %s is still on a chunk past transform.chunk_timeout; left behind",
                    thread.name,
                    extra={"stage": "transform"},
                )


@dataclass
class _ThreadTask:
    chunk: Chunk
    future: concurrent.futures.Future[ChunkResult]
    started: Callable[[], object] | None
    """Called (on the thread) as a thread takes the chunk: starts its ``chunk_timeout`` clock."""


class _ChunkThread(threading.Thread):
    """One of the thread executor's threads: a daemon, so one left on a stuck chunk never
    holds the process at exit (``concurrent.futures``' pool joins its threads at exit)."""

    def __init__(self, tasks: queue.SimpleQueue[_ThreadTask | None], number: int) -> None:
        super().__init__(name=f"transform-{number}", daemon=True)
        self.tasks = tasks
        self.holding: Chunk | None = None
        """The chunk this thread is on now (the watchdog's ``busy``)."""
        self.started: float | None = None
        """``time.monotonic()`` when it took that chunk."""
        self.abandoned = False
        """Its chunk ran past ``chunk_timeout``: nobody waits for this thread any more."""

    def run(self) -> None:
        while (task := self.tasks.get()) is not None:
            if not task.future.set_running_or_notify_cancel():
                continue  # abandoned before it started (the run is stopping)
            self.started, self.holding = time.monotonic(), task.chunk
            if task.started is not None:
                try:
                    task.started()
                except RuntimeError:  # the loop is closed: nobody awaits the chunk
                    pass
            try:
                result = run_chunk(task.chunk)
            except BaseException as e:  # every outcome reaches the awaiting chunk
                _settle(task.future, error=e)
            else:
                _settle(task.future, result=result)
            finally:
                self.holding = self.started = None


def mp_context() -> multiprocessing.context.BaseContext:
    """forkserver: never fork the threaded parent; workers come from a clean server process
    that imported pandas, pyarrow and the steps once (``etl.core.forkserver``)."""
    return forkserver.context()


class _Slot(threading.Thread):
    """One worker process and the parent thread that owns it: its own pipe, one chunk at a time.

    The thread takes a chunk from the executor's queue, starts a worker if it has none (or
    its worker died while idle), sends the chunk, and waits for the reply on the pipe. End
    of file on the pipe means the worker died: its chunk fails as ``WorkerCrashed`` naming
    the signal, and the next chunk gets a new worker. No other process shares the pipe, so
    a worker killed at any moment (receiving, computing, sending) can hurt nothing but its
    own chunk."""

    def __init__(self, owner: ProcessExecutor, number: int) -> None:
        super().__init__(name=f"transform-slot-{number}", daemon=True)
        self.owner = owner
        self.number = number
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.holding: Chunk | None = None
        """The chunk this slot has taken and not yet answered (the watchdog's ``busy``)."""
        self.pidfd: int | None = None
        """The worker's pidfd: waits for its exit and signals it without the fork server."""
        self.lock = threading.Lock()  # guards proc/conn/pidfd against close() from the loop's thread

    def run(self) -> None:
        owner = self.owner
        self._warm_up()
        while True:
            task = owner._tasks.get()
            if task is None:  # close(): one None per slot
                break
            chunk, future = task
            with owner._pending_lock:  # against _break() failing it meanwhile
                if future.done():  # failed already: the pool broke
                    continue
                if not future.set_running_or_notify_cancel():
                    continue  # abandoned before it started (the run is stopping)
            self.holding = chunk
            try:
                result = self._attempt(chunk)
            except BaseException as e:  # every outcome reaches the awaiting chunk: none is lost
                _settle(future, error=e)
            else:
                _settle(future, result=result)
            finally:
                self.holding = None
        self.stop_worker()

    # -------------------------------------------------------------- one attempt

    def _attempt(self, chunk: Chunk) -> ChunkResult:
        owner = self.owner
        conn = self._ready_worker(chunk)
        try:
            send_chunk(conn, chunk)
        except (OSError, ValueError):  # EPIPE: it died while receiving; ValueError: closed by close()
            raise self._crashed(chunk) from None
        owner._ipc.bytes_sent += chunk.nbytes
        if not wait([conn], owner._timeout):
            self.stop_worker(kill=True)
            raise ChunkTimeout(
                f"chunk ran longer than transform.chunk_timeout = {owner._timeout}s; worker killed",
                item=chunk.label,
                signal="killed at timeout",
            )
        try:
            ok, value, text = recv_message(conn)
        except (EOFError, OSError, ValueError):  # died before or while sending its reply
            raise self._crashed(chunk) from None
        if not ok:
            if isinstance(value, ETLError) and not value.item:
                value.item = chunk.label
            if text:  # keep the worker's traceback as the cause
                value.__cause__ = RemoteTraceback(text)
            raise value
        owner._ipc.bytes_received += value.nbytes
        return cast(ChunkResult, value)

    def _crashed(self, chunk: Chunk) -> WorkerCrashed:
        how = describe_exit(self.stop_worker())
        return WorkerCrashed(f"worker process died: {how}", item=chunk.label, signal=how)

    def _ready_worker(self, chunk: Chunk) -> Connection:
        """This slot's live worker, started (and waited for) if it has none or it died idle."""
        conn = self.conn
        if conn is not None and conn.poll():  # an idle worker never speaks: end of file, it died
            how = describe_exit(self.stop_worker())
            log.info("transform worker died while idle (%s); starting a new one", how, extra={"stage": "transform"})
            conn = None
        while conn is None:
            conn = self._start_worker(chunk)
        return conn

    def _warm_up(self) -> None:
        """Start the worker as the pool starts, so the first chunk does not wait for it; a
        failure here is only logged (the first chunk starts one again, and counts)."""
        try:
            self._start_worker(None)
        except (ETLError, RuntimeError) as e:
            log.info("transform worker %d did not start: %s", self.number, e, extra={"stage": "transform"})

    def _start_worker(self, chunk: Chunk | None) -> Connection | None:
        owner = self.owner
        ours, theirs = owner._ctx.Pipe()
        with self.lock:
            if owner._closed.is_set():
                raise RuntimeError("the process executor is closed")
            proc = owner._ctx.Process(  # type: ignore[attr-defined]  # BaseContext.Process exists on every concrete context
                target=owner._serve, args=(theirs, owner._spec), name=f"etl-transform-{self.number}", daemon=True
            )
            try:
                proc.start()
            except (EOFError, OSError) as e:  # the fork server died under us: the next start makes a new one
                ours.close()
                self._start_failed(chunk, f"the fork server failed: {type(e).__name__}: {e}")
                return None
            finally:
                theirs.close()  # the worker holds the only other end: its death is our end of file
            self.proc, self.conn, self.pidfd = proc, ours, _pidfd(proc.pid)
        try:
            ready = bool(wait([ours], WORKER_START_TIMEOUT)) and ours.recv() == READY
        except (EOFError, OSError):
            ready = False
        if ready:
            owner._start_failures = 0
            return ours
        self._start_failed(chunk, describe_exit(self.stop_worker()))
        return None

    def _start_failed(self, chunk: Chunk | None, how: str) -> None:
        """Count a failed start; fail the chunk past ``MAX_START_FAILURES``, else back off.

        The back-off gives a fork server that was just killed time to be gone: until the
        parent can reap it, multiprocessing thinks it alive and connects in vain."""
        owner = self.owner
        owner._start_failures += 1
        if owner._start_failures > MAX_START_FAILURES:
            if chunk is None:  # warming up: no chunk to fail yet (the first one starts again, and fails)
                raise ETLError(
                    f"{owner._start_failures} transform workers in a row died while starting (last: {how})",
                    stage="transform",
                )
            raise owner._break(
                f"{owner._start_failures} transform workers in a row died while starting (last: {how}), "
                f"more than {MAX_START_FAILURES}: the pool cannot start workers"
            )
        log.warning("a transform worker died while starting (%s); starting another", how, extra={"stage": "transform"})
        owner._closed.wait(min(START_BACKOFF * 2 ** (owner._start_failures - 1), START_BACKOFF_MAX))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to this slot's worker through its pidfd (never a reused pid)."""
        with self.lock:
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signum)
                except ProcessLookupError:
                    pass  # it has exited already

    def stop_worker(self, kill: bool = False) -> int | None:
        """Stop this slot's worker (if any: an idle one exits when its pipe closes; ``kill``,
        or one still there after ``WORKER_EXIT_GRACE``, gets SIGKILL) and return its exit code.

        Exit is seen on the pidfd, so a worker orphaned by a killed fork server (whose exit
        status is lost: the fork server reports it) is still stopped, never left running."""
        if kill:
            self.signal(signal.SIGKILL)
        with self.lock:
            proc, conn, pidfd = self.proc, self.conn, self.pidfd
            self.proc = self.conn = self.pidfd = None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        try:
            if pidfd is not None and not select.select([pidfd], [], [], WORKER_EXIT_GRACE)[0]:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], WORKER_EXIT_GRACE)
            proc.join(WORKER_EXIT_GRACE)  # its status, from the fork server (255 if the server is gone)
            return proc.exitcode
        finally:
            if pidfd is not None:
                os.close(pidfd)
            if proc.exitcode is not None:
                proc.close()


class ProcessExecutor(Executor):
    """Worker processes from the fork server, each with its own pipe and parent thread.

    Why not a shared pool: pebble's ``ProcessPool`` (used before issue 21) sends every task
    down one pipe that all workers read, and takes every result up one pipe that all write,
    each guarded by a cross-process lock. A worker SIGKILLed while holding one of them
    (receiving a task, sending a result) never releases it: the other workers wait 60 s
    for it and exit with code 1, the pool breaks ("All workers expired") and the chunks
    it held are never failed, so the run waited forever. Here each worker has a pipe of its
    own: a death is end of file on that pipe, it fails exactly the one chunk that worker
    held, and nothing else waits on it. ``ChunkRunner`` decides what happens to the chunk.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        timeout: float | None,
        *,
        serve: Callable[[Connection, WorkerSpec], None] = serve,
    ) -> None:
        """``serve``: what a worker runs (tests pass one that dies at a chosen moment)."""
        self.workers = workers
        self._spec = spec
        self._timeout = timeout
        self._serve = serve
        self._ctx = mp_context()
        # Unbounded by type, bounded in use: the dispatcher submits at most in_flight chunks.
        self._tasks: queue.SimpleQueue[tuple[Chunk, concurrent.futures.Future[ChunkResult]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = threading.Event()
        self._ipc = IpcStats()
        self._start_failures = 0
        # Every chunk submitted and not answered (queued or held by a slot), in submission
        # order: what a broken pool's error names. Bounded like _tasks, by in_flight.
        self._pending: dict[concurrent.futures.Future[ChunkResult], Chunk] = {}
        self._pending_lock = threading.RLock()  # re-entrant: settling a future calls _answered()
        self._broken: ETLError | None = None
        """Set once the pool cannot start workers: every chunk fails with it from then on."""
        self._slots = [_Slot(self, n) for n in range(workers)]
        for slot in self._slots:
            slot.start()

    async def run(self, chunk: Chunk) -> ChunkResult:
        if self._closed.is_set():
            raise RuntimeError("the process executor is closed")
        if self._broken is not None:
            raise self._broken
        future: concurrent.futures.Future[ChunkResult] = concurrent.futures.Future()
        with self._pending_lock:
            self._pending[future] = chunk
        future.add_done_callback(self._answered)
        self._tasks.put((chunk, future))
        return await asyncio.wrap_future(future)

    def _answered(self, future: concurrent.futures.Future[ChunkResult]) -> None:
        with self._pending_lock:
            self._pending.pop(future, None)

    def _break(self, why: str) -> ETLError:
        """The pool cannot go on (issue 21, item 3): fail every chunk queued or in flight with
        one error naming them all, so none waits for a worker that will never come, and
        every later chunk fails with it at once. Returns the error (raised by the caller)."""
        with self._pending_lock:
            lost = list(self._pending.items())
            labels = [chunk.label for _, chunk in lost]
            named = "; ".join(labels[:MAX_NAMED_CHUNKS])
            if len(labels) > MAX_NAMED_CHUNKS:
                named += f"; and {len(labels) - MAX_NAMED_CHUNKS} more"
            error = ETLError(  # not a WorkerCrashed: retrying the chunks cannot help
                f"{why}; {len(labels)} chunk{'s' if len(labels) != 1 else ''} queued or in flight "
                f"could not be resubmitted: {named}",
                stage="transform",
                item=labels[0] if len(labels) == 1 else f"{len(labels)} chunks",
            )
            self._broken = error
            for future, _ in lost:
                _settle(future, error=error)
        return error

    def busy(self) -> int:
        """Chunks a worker holds now (sent, or being sent, and not answered)."""
        return sum(slot.holding is not None for slot in self._slots)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for diagnostics and tests)."""
        return [p.pid for s in self._slots if (p := s.proc) is not None and p.pid is not None]

    def ipc_stats(self) -> IpcStats:
        own = sum(_thread_cpu(s.native_id) for s in self._slots if s.native_id is not None)
        return IpcStats(own, self._ipc.bytes_sent, self._ipc.bytes_received)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        while True:  # chunks nobody took: abandoned
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[1].cancel()
        for _ in self._slots:
            self._tasks.put(None)
        for slot in self._slots:  # a busy worker's slot wakes on its end of file
            slot.signal(signal.SIGTERM)
        for slot in self._slots:
            slot.join(2 * WORKER_EXIT_GRACE + 1)
            slot.stop_worker()


def _settle(
    future: concurrent.futures.Future[ChunkResult],
    *,
    result: ChunkResult | None = None,
    error: BaseException | None = None,
) -> None:
    """Give ``future`` its outcome unless it has one (a broken pool failed it already)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(ChunkResult, result))
    except concurrent.futures.InvalidStateError:
        pass  # answered already: the first outcome stands


def _pidfd(pid: int | None) -> int | None:
    """A pidfd for ``pid``; None if it is gone already (then its pipe's end of file tells)."""
    try:
        return os.pidfd_open(pid) if pid is not None else None
    except ProcessLookupError:
        return None


def _thread_cpu(tid: int) -> float:
    try:  # schedstat: nanoseconds on the CPU; safe to read for a thread that already exited
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"

"""The transform stage on a Dask distributed cluster (``transform.executor = "dask"``).

``transform.dask.address`` is a scheduler (``tcp://scheduler:8786``) or ``local``: a
LocalCluster of ``workers`` processes with one thread each, started for the run and
stopped with it.

Contract (the same as every executor in ``etl.transform.stage``):

* ``run(chunk)`` is one attempt of one chunk; the dispatcher awaits at most ``in_flight``
  of them at once, so at most ``in_flight`` chunks are on the cluster (backpressure holds
  end to end: a slow cluster stops the readers).
* **In**: the ``Chunk`` is scattered straight to a worker (not through the scheduler),
  then one task runs ``run_chunk`` on it. **Out**: the ``ChunkResult`` is gathered
  straight from that worker; both are released as soon as the attempt ends.
* **Worker set-up**: the ``WorkerSpec`` travels once per worker in a ``WorkerPlugin``,
  which the scheduler replays on every worker that joins later, including one its nanny
  restarted. Specs are kept per job token, so jobs can share a cluster; the plugin is
  removed from a shared cluster when the run ends.
* **Crashes**: a worker that dies on a chunk (``KilledWorker``; or its scattered chunk
  lost with it) raises ``WorkerCrashed``, so the dispatcher's ``max_attempts`` applies as
  for the process pool. A LocalCluster's scheduler is told to give up on a task at the
  first death (``allowed-failures = 0``) so every crash is counted and logged by the
  dispatcher; a remote scheduler keeps its own setting.
* **Timeouts**: past ``chunk_timeout`` the attempt is abandoned (``ChunkTimeout``) and
  retried; Dask cannot stop a running task, so that worker finishes it in the background.
  A scatter that finds no worker (the cluster lost them all: Dask's
  ``distributed.comm.timeouts.connect``, 30 s) is a ``WorkerCrashed`` ("no workers"), retried.
* **Lost chunks** (issue 21): a chunk whose task no worker runs (every worker gone for
  good, nanny included, so nothing restarts one) is the stall watchdog's: ``busy()`` asks
  the scheduler which of this job's tasks a worker is processing; with none, after
  ``transform.stall_timeout`` the attempt is cancelled and retried, and past ``max_attempts``
  the run fails naming the chunk (``tests/transform/test_distributed.py`` runs it end to end).
* **Frozen workers** (issue 21: SIGSTOPped, swapped out, a GIL held for good): the process
  is there and its sockets accept, but it runs nothing and never answers. The scheduler
  notices only when its heartbeats stop for ``distributed.scheduler.worker-ttl``: a
  LocalCluster's is ``LOCAL_WORKER_TTL``, after which the scheduler has its nanny restart
  it and the chunks it held fail as "worker died" and are retried; a remote cluster keeps
  its own (Dask's default is 5 minutes). Until then a worker whose last heartbeat is
  ``STALE_AFTER`` behind the freshest worker's gets no new chunk (scatter is told which
  workers to use, and the task follows its data), and ``busy()`` does not count what it
  holds, so the stall watchdog can resubmit it.
* **Failed runs are quiet**: every attempt's outcome is retrieved even when its awaiter was
  cancelled, and the client loop logs an exception nothing retrieved (distributed's own
  tasks at shutdown) as one line (debug for a closed connection), never as a traceback.

The client lives on its own event loop in a thread: scatter, gather and (de)serialising
results stay off the pipeline's loop, and ``close()`` can stop everything synchronously.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar, cast

import dask
import psutil
from distributed import Client, LocalCluster
from distributed.client import FutureCancelledError
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from etl.core.config import TransformConfig
from etl.core.errors import ChunkTimeout, ETLError, WorkerCrashed
from etl.core.records import Chunk, ChunkResult
from etl.transform.executors import Executor
from etl.transform.worker import WorkerSpec, init_worker, run_chunk

log = logging.getLogger("etl.dask")

T = TypeVar("T")

# Seconds to start a LocalCluster or reach a scheduler (and its first answer): long enough
# for a cold start of worker processes, short enough that a wrong address fails the run soon.
START_TIMEOUT = 60.0
# Seconds busy() waits for the scheduler's answer: the watchdog asks only after a stall.
BUSY_TIMEOUT = 10.0
# Seconds close() waits for the client (and a LocalCluster) to shut down before giving up.
CLOSE_TIMEOUT = 30.0
# Deaths a LocalCluster's scheduler tolerates per task before KilledWorker: 0 hands every
# crash to the dispatcher, which retries it up to transform.max_attempts and reports it.
LOCAL_ALLOWED_FAILURES = 0
# Scatter and gather talk to workers directly: chunk bytes never pass through the scheduler
# (needs the client to reach the workers' ports, as it does inside one network).
DIRECT_TO_WORKERS = True
# Seconds without a heartbeat before a LocalCluster's scheduler restarts a worker (Dask's
# default is 5 minutes): shorter finds a frozen worker sooner, but may restart one whose
# event loop a long GIL-holding step keeps from heartbeating (its chunk is then retried).
LOCAL_WORKER_TTL = 15.0
# Seconds a worker's last heartbeat may lag the freshest worker's before it counts as frozen
# (no new chunks, its tasks not "busy"): Dask heartbeats every 0.5-2 s up to 200 workers, so
# this is several missed beats; shorter would shun a worker for one slow beat.
STALE_AFTER = 5.0
# Seconds one look at the workers' heartbeats serves every attempt starting meanwhile: one
# scheduler call per second at most, however many chunks start.
FRESH_CACHE = 1.0

_SPECS: dict[str, WorkerSpec] = {}  # in each worker process: job token -> that job's spec


class SpecPlugin(WorkerPlugin):
    """Gives every worker (also one restarted later) this job's ``WorkerSpec``."""

    def __init__(self, token: str, spec: WorkerSpec) -> None:
        self.name = f"etl-spec-{token}"
        self.token = token
        self.spec = spec

    def setup(self, worker: Any) -> None:
        _SPECS[self.token] = self.spec

    def teardown(self, worker: Any) -> None:
        _SPECS.pop(self.token, None)


class _Running:
    """Which job's spec ``etl.transform.stage`` holds in this worker, and how many chunks use it."""

    cond = threading.Condition()
    token = ""
    count = 0


def run_remote(token: str, chunk: Chunk) -> ChunkResult:
    """The task a Dask worker runs: ``run_chunk`` with this job's spec.

    ``run_chunk`` reads one process-wide spec, so in a worker with several threads the
    chunks of one job run together while another job's wait (jobs sharing a cluster).
    """
    spec = _SPECS.get(token)
    if spec is None:
        raise ETLError(
            "this Dask worker has no spec for the job (its plugin was not set up)", stage="transform", item=chunk.label
        )
    with _Running.cond:
        _Running.cond.wait_for(lambda: _Running.count == 0 or _Running.token == token)
        if _Running.token != token:
            init_worker(spec)  # the spec, and the job folder on sys.path for ``python`` steps
            _Running.token = token
        _Running.count += 1
    try:
        return run_chunk(chunk)
    finally:
        with _Running.cond:
            _Running.count -= 1
            _Running.cond.notify_all()


class DaskExecutor(Executor):
    """Runs chunks on a Dask cluster through the futures API (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, workers: int, cfg: TransformConfig, budget: int | None = None) -> None:
        self.address = cfg.dask.address
        self._budget = budget
        self._timeout = cfg.chunk_timeout
        self._token = uuid.uuid4().hex[:12]
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None
        self._attempts: set[asyncio.Task[Any]] = set()
        self._keys: set[object] = set()  # this job's tasks on the cluster now (for busy())
        self._fresh: tuple[float, list[str] | None] = (-FRESH_CACHE, None)  # (when, workers heard from)
        self._fresh_lock: asyncio.Lock | None = None
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_exception)
        self._thread = threading.Thread(target=self._loop.run_forever, name="dask-client", daemon=True)
        self._thread.start()
        try:
            self.workers = self._call(self._start(spec, workers), START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the client's loop and wait for it here (blocking)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, spec: WorkerSpec, workers: int) -> int:
        target: str | LocalCluster = self.address
        try:
            if self.address == "local":
                self._cluster = await _local_cluster(workers, self._budget)
                target = self._cluster
            # Connect timeout: Dask's distributed.comm.timeouts.connect (30s by default).
            self._client = await Client(target, asynchronous=True, direct_to_workers=DIRECT_TO_WORKERS)  # type: ignore[no-untyped-call]  # distributed's Client() has no annotations
            await self._client.register_plugin(SpecPlugin(self._token, spec))
        except (OSError, TimeoutError) as e:
            raise ETLError(
                f"cannot reach the Dask scheduler at {self.address!r} (transform.dask.address): {e}",
                stage="transform",
                item=self.address,
            ) from e
        threads = sum((await self._client.nthreads()).values())
        log.info(
            "dask: %s, %d worker threads; dashboard %s",
            self.address,
            threads,
            self._client.dashboard_link if self._cluster is None else "off",
            extra={"stage": "transform", "source": ""},
        )
        return threads or workers  # a remote cluster may have no workers yet

    def close(self) -> None:
        """Cancel this job's chunks, close the client and stop a LocalCluster. Idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                self._call(self._shutdown(), CLOSE_TIMEOUT)
            except (concurrent.futures.TimeoutError, OSError, RuntimeError) as e:
                log.warning("dask: shutdown did not finish cleanly: %s", e, extra={"stage": "transform", "source": ""})
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        for task in list(self._attempts):
            task.cancel()
        if self._client is not None:
            if self._cluster is None:  # a shared cluster: leave no spec behind on its workers
                try:
                    await self._client.unregister_worker_plugin(f"etl-spec-{self._token}")  # type: ignore[no-untyped-call]  # Client.unregister_worker_plugin() has no annotations
                except (OSError, ValueError, KeyError) as e:
                    log.debug("dask: could not unregister the plugin: %s", e)
            await self._client.close(timeout=CLOSE_TIMEOUT)  # type: ignore[no-untyped-call]  # Client.close() has no annotations
        if self._cluster is not None:
            # An asynchronous cluster's close() returns an awaitable (None only for a synchronous one).
            await cast(Awaitable[None], self._cluster.close(timeout=CLOSE_TIMEOUT))

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> process id (for diagnostics and tests)."""
        client = self._client
        assert client is not None

        async def pids() -> dict[str, int]:  # an asynchronous client's run() is an awaitable, not a coroutine
            return cast(dict[str, int], await client.run(os.getpid))

        return self._call(pids(), CLOSE_TIMEOUT)

    def busy(self) -> int:
        """This job's tasks the scheduler has on a worker now (blocking: one scheduler call)."""
        try:
            return self._call(self._processing(), BUSY_TIMEOUT)
        except (concurrent.futures.TimeoutError, OSError) as e:  # no answer: say busy, never act on a guess
            log.warning(
                "dask: the scheduler did not say what it runs: %s", e, extra={"stage": "transform", "source": ""}
            )
            return len(self._keys)

    async def _processing(self) -> int:
        assert self._client is not None
        ours = set(self._keys)
        fresh = set(await self._workers_heard_from(refresh=True) or ())
        processing = await cast(Awaitable[dict[str, list[object]]], self._client.processing())  # type: ignore[no-untyped-call]  # Client.processing() has no annotations
        # A frozen worker's tasks are not progress: the watchdog may resubmit them.
        return sum(key in ours for worker, keys in processing.items() if worker in fresh for key in keys)

    async def _workers_heard_from(self, refresh: bool = False) -> list[str] | None:
        """Workers whose last heartbeat is within ``STALE_AFTER`` of the freshest worker's
        (relative, so a remote scheduler's clock need not match ours); None with no workers."""
        if self._fresh_lock is None:
            self._fresh_lock = asyncio.Lock()
        async with self._fresh_lock:
            when, workers = self._fresh
            if refresh or time.monotonic() - when >= FRESH_CACHE:
                scheduler = self._client.scheduler if self._client is not None else None
                assert scheduler is not None
                # Client.scheduler_info() of an asynchronous client is a cache without workers;
                # its docstring points here for worker information on demand.
                info = await scheduler.identity(n_workers=-1)
                seen = {address: float(w["last_seen"]) for address, w in info["workers"].items()}
                newest = max(seen.values(), default=0.0)
                workers = [a for a, last in seen.items() if newest - last <= STALE_AFTER] or None
                self._fresh = (time.monotonic(), workers)
            return workers

    # ------------------------------------------------------------------ chunks

    async def run(self, chunk: Chunk) -> ChunkResult:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._attempt(chunk), self._loop))

    async def _attempt(self, chunk: Chunk) -> ChunkResult:
        """One attempt, on the client's loop: scatter, submit, gather, release."""
        client = self._client
        assert client is not None
        me = asyncio.current_task()
        assert me is not None
        self._attempts.add(me)
        me.add_done_callback(_retrieve)  # an awaiter cancelled meanwhile never reads the outcome
        data = task = None
        try:
            # Only to workers heard from lately: a frozen one would take the chunk and never
            # answer. The task then runs where its data is.
            workers = await self._workers_heard_from()
            data = await client.scatter(chunk, workers=workers, hash=False, direct=DIRECT_TO_WORKERS)  # type: ignore[no-untyped-call]  # Client.scatter() has no annotations
            task = client.submit(run_remote, self._token, data, pure=False)
            self._keys.add(task.key)
            return await asyncio.wait_for(task, self._timeout)
        except KilledWorker as e:
            raise WorkerCrashed(
                f"Dask worker {e.last_worker.address} died while running the chunk",
                item=chunk.label,
                signal="worker died",
            ) from None
        except FutureCancelledError as e:
            # The worker holding the scattered chunk died: Dask cannot recompute scattered data.
            raise WorkerCrashed(
                f"the chunk was lost on the cluster ({e.reason})", item=chunk.label, signal="worker lost"
            ) from None
        except TimeoutError as e:
            if task is None:  # scatter found no worker to take the chunk (distributed.comm.timeouts.connect)
                raise WorkerCrashed(
                    f"no Dask worker took the chunk ({e or 'timed out'}): the cluster has no workers now",
                    item=chunk.label,
                    signal="no workers",
                ) from None
            if self._timeout is None:  # not ours: a call to the cluster timed out
                raise WorkerCrashed(
                    f"a call to the Dask cluster timed out: {e or 'TimeoutError'}", item=chunk.label, signal="timeout"
                ) from None
            raise ChunkTimeout(
                f"chunk ran longer than transform.chunk_timeout = {self._timeout}s; attempt "
                "abandoned (Dask cannot stop a running task: its worker finishes it unseen)",
                item=chunk.label,
                signal="none (timeout)",
            ) from None
        except OSError as e:  # a connection to a worker broke while sending or fetching
            raise WorkerCrashed(
                f"lost the connection to a Dask worker: {e}", item=chunk.label, signal="connection lost"
            ) from e
        finally:
            self._attempts.discard(me)
            if task is not None:
                self._keys.discard(task.key)
            for future in (task, data):
                if future is not None:
                    future.release()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark an attempt's exception as retrieved (its awaiter has it, or was cancelled)."""
    if not task.cancelled():
        task.exception()


def _quiet_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The client loop's handler for exceptions nothing awaited (distributed's own tasks,
    mostly at shutdown): one line, no traceback. A closed connection (the sends of a scatter
    whose attempt was abandoned, to a worker frozen or gone) is expected: debug only."""
    error = context.get("exception")
    log.log(
        logging.DEBUG if isinstance(error, OSError) else logging.WARNING,
        "dask: %s%s",
        context.get("message", "unhandled error"),
        f": {type(error).__name__}: {error}" if error is not None else "",
        extra={"stage": "transform", "source": ""},
    )


# A Dask worker process alone holds ~150 MiB; below this floor it would pause or be
# restarted by its nanny on every chunk, so a tiny budget is raised to it.
DASK_WORKER_MIN_MEMORY = 384 << 20


async def _local_cluster(workers: int, budget: int | None) -> LocalCluster:
    """``workers`` processes, one thread each, sharing the run's memory budget (the plan of
    etl/resources.py), or the memory available now when there is none."""
    share = (budget if budget else psutil.virtual_memory().available) // workers
    memory = max(share, DASK_WORKER_MIN_MEMORY)
    # The scheduler runs in this process: its per-event INFO lines would drown the run's log.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with dask.config.set({"distributed.scheduler.allowed-failures": LOCAL_ALLOWED_FAILURES}):
        return await LocalCluster(  # type: ignore[no-untyped-call]  # distributed's LocalCluster() has no annotations
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory,
            host="127.0.0.1",
            asynchronous=True,
            silence_logs=logging.WARNING,
            # The scheduler always serves HTTP (health, metrics); a free port, not 8787,
            # so runs side by side never collide. No dashboard (it needs bokeh).
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": False, "worker_ttl": LOCAL_WORKER_TTL},
        )

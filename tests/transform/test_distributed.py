"""transform.executor = "dask" on a LocalCluster of 2 worker processes (real processes, real kill -9)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from etl.core.config import load_job
from etl.run.pipeline import RunOptions, run_job
from tests.conftest import JobWriter
from tests.run.test_pipeline import job_text

FIRST_DASK_CHUNK = '''
import os, signal, threading

def first_dask_chunk(marker):
    """True in the first chunk any Dask worker of the run gets, once per run."""
    from distributed import get_worker
    try:
        get_worker()
    except ValueError:  # not a Dask worker: e.g. etl.run.resources measuring a chunk beforehand
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
'''

KILLER = (
    FIRST_DASK_CHUNK
    + '''
def step(df, marker, fifo):
    """The first chunk a Dask worker gets tells the test its pid, then waits to be killed."""
    if first_dask_chunk(marker):
        with open(fifo, "w") as f:
            f.write(str(os.getpid()))
        threading.Event().wait(30)  # SIGKILL arrives long before
    return df
'''
)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(path: Path, *overrides: str) -> object:
    return asyncio.run(run_job(load_job(path, list(overrides)), RunOptions(full_refresh=True)))


def test_dask_output_equals_the_process_executors_file_for_file(trips_dir: Path, write_job: JobWriter) -> None:
    sources = '["data/trips-*.csv"]'
    run(write_job(job_text(sources, "process", out="out-process")))
    summary = run(write_job(job_text(sources, "dask", out="out-dask"), "dask.toml"))
    root = trips_dir.parent
    want = tree_hashes(root / "out-process")
    assert len(want) >= 3  # three months: one file each, cut from several chunks
    assert tree_hashes(root / "out-dask") == want
    assert summary.chunks > 4 and summary.transform["retries"] == 0


def kill_when_told(fifo: Path, killed: list[int]) -> threading.Thread:
    """Read a worker's pid from the FIFO (open blocks until the step opens it) and SIGKILL it."""

    def wait_and_kill() -> None:
        with open(fifo) as f:
            text = f.read()
        if text:  # empty when the test released us because no chunk ever got there
            os.kill(int(text), signal.SIGKILL)
            killed.append(int(text))

    thread = threading.Thread(target=wait_and_kill, daemon=True)
    thread.start()
    return thread


def release(fifo: Path, thread: threading.Thread) -> None:
    """Unblock a killer thread still waiting for a writer."""
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # it opened the FIFO meanwhile and is finishing on its own
        thread.join(5)


def test_a_killed_dask_worker_costs_a_retry_not_the_run(trips_dir: Path, write_job: JobWriter) -> None:
    root = trips_dir.parent
    (root / "killer.py").write_text(KILLER)
    marker, fifo = root / "killed.marker", root / "pid.fifo"
    os.mkfifo(fifo)
    step = f'{{op = "python", function = "killer:step", params = {{marker = "{marker}", fifo = "{fifo}"}}}},'
    text = job_text('["data/trips-0.csv"]', "dask", out="out-dask").replace(
        "steps = [\n", "steps = [\n  " + step + "\n"
    )

    marker.touch()  # the reference run: the step lets every chunk through
    run(write_job(text.replace('"dask"', '"serial"').replace("out-dask", "out-serial"), "serial.toml"))
    marker.unlink()

    killed: list[int] = []
    killer = kill_when_told(fifo, killed)
    try:
        summary = run(write_job(text))
    finally:
        release(fifo, killer)
    assert len(killed) == 1  # a real worker process died mid-chunk
    assert summary.transform["retries"] >= 1, summary.transform
    assert tree_hashes(root / "out-dask") == tree_hashes(root / "out-serial")


def test_a_wrong_scheduler_address_fails_with_a_clear_error(trips_dir: Path, write_job: JobWriter) -> None:
    import dask

    from etl.core.errors import ETLError

    job = write_job(job_text('["data/trips-0.csv"]', "dask"))
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), pytest.raises(ETLError) as e:
        run(job, 'transform.dask.address="tcp://127.0.0.1:9"')
    assert "transform.dask.address" in str(e.value) and "127.0.0.1:9" in str(e.value)


def test_local_cluster_workers_share_the_runs_memory_budget(trips_dir: Path, write_job: JobWriter) -> None:
    from etl.transform.distributed import LOCAL_WORKER_TTL, DaskExecutor
    from etl.transform.worker import WorkerSpec

    cfg = load_job(write_job(job_text('["data/trips-*.csv"]', executor="dask")))
    executor = DaskExecutor(WorkerSpec(cfg.transform, cfg.output, cfg.read), 2, cfg.transform, budget=2 * 2**30)
    try:
        assert executor._cluster is not None
        limits = [w.memory_manager.memory_limit for w in executor._cluster.workers.values()]
        ttl = executor._cluster.scheduler.worker_ttl
        pids = executor.worker_pids()
    finally:
        executor.close()
    assert limits == [2**30, 2**30]  # the 2 GiB budget split between two workers
    assert ttl == LOCAL_WORKER_TTL  # a frozen worker is restarted in seconds, not Dask's 5 minutes
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()  # two real worker processes


HOLDER = '''
def step(df, ready, release):
    """In a Dask worker: tell the test it holds a chunk, then wait until the test lets go."""
    from distributed import get_worker
    try:
        get_worker()
    except ValueError:  # not a Dask worker
        return df
    with open(ready, "w") as f:  # opens once the test reads
        f.write("1")
    with open(release) as f:  # returns once the test has written and closed
        f.read()
    return df
'''


def test_busy_counts_the_jobs_chunks_a_dask_worker_is_on(trips_dir: Path, write_job: JobWriter) -> None:
    """What the stall watchdog asks (issue 21): 1 while a worker runs the chunk, 0 after."""
    from etl.core.records import Source, StagedFile
    from etl.read.formats import read_chunks
    from etl.transform.distributed import DaskExecutor
    from etl.transform.worker import WorkerSpec

    root = trips_dir.parent
    (root / "holder.py").write_text(HOLDER)
    ready, release_ = root / "ready.fifo", root / "release.fifo"
    os.mkfifo(ready)
    os.mkfifo(release_)
    step = f'{{op = "python", function = "holder:step", params = {{ready = "{ready}", release = "{release_}"}}}},'
    text = job_text('["data/trips-*.csv"]', "dask").replace("steps = [\n", "steps = [\n  " + step + "\n")
    cfg = load_job(write_job(text))
    path = sorted((root / "data").glob("trips-*.csv"))[0]
    source = Source(0, str(path), path.name, "csv")
    chunk = next(iter(read_chunks(StagedFile(source, path, path.stat().st_size), cfg.read)))

    async def go() -> tuple[int, int, int]:
        ex = DaskExecutor(WorkerSpec(cfg.transform, cfg.output, cfg.read), 1, cfg.transform)
        try:
            before = await asyncio.to_thread(ex.busy)
            attempt = asyncio.create_task(ex.run(chunk))
            await asyncio.wait_for(asyncio.to_thread(ready.read_text), 60)  # the worker is on it
            during = await asyncio.to_thread(ex.busy)
            await asyncio.to_thread(release_.write_text, "go")
            await asyncio.wait_for(attempt, 60)
            return before, during, await asyncio.to_thread(ex.busy)
        finally:
            ex.close()

    assert asyncio.run(go()) == (0, 1, 0)


# --------------------------------------------- a chunk lost on the cluster (issue 21, item 4)
#
# A worker that vanishes for good while it holds a chunk: it closes itself *and its nanny*,
# so nothing restarts it (a remote cluster losing a machine, an autoscaler taking one away).
# Its chunk fails as KilledWorker; the retry finds a surviving worker, or, with none left,
# sits on the scheduler with no worker to run it: the stall watchdog's case. Each case runs
# a few times; a hang fails at HANG_GUARD instead of waiting forever.

VANISH = '''
import asyncio, os, threading

def step(df, marker):
    """The first chunk a Dask worker gets makes that worker and its nanny close for good."""
    from distributed import get_worker
    try:
        worker = get_worker()
    except ValueError:  # not a Dask worker: e.g. etl.run.resources measuring a chunk beforehand
        return df
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return df
    asyncio.run_coroutine_threadsafe(worker.close(nanny=True, reason="test: vanish"), worker.loop.asyncio_loop)
    threading.Event().wait(30)  # the nanny kills this process long before
    return df
'''

HANG_GUARD = 120.0  # seconds: far above a run's few seconds; only a hang reaches it
ROUNDS = int(os.environ.get("ETL_TEST_ROUNDS", "3"))


def vanishing_job(root: Path, write_job: JobWriter, workers: int, marker: Path) -> tuple[Path, str]:
    (root / "vanish.py").write_text(VANISH)
    step = f'{{op = "python", function = "vanish:step", params = {{marker = "{marker}"}}}},'
    text = job_text('["data/trips-0.csv"]', "dask", out="out-dask").replace(
        "steps = [\n", "steps = [\n  " + step + "\n"
    )
    text = text.replace("workers = 2", f"workers = {workers}\nstall_timeout = 2\nmax_attempts = 2")
    return write_job(text, f"vanish-{workers}.toml"), text


def guarded_run(path: Path) -> object:
    async def go() -> object:
        return await asyncio.wait_for(run_job(load_job(path), RunOptions(full_refresh=True)), HANG_GUARD)

    return asyncio.run(go())


def test_a_worker_that_vanishes_with_its_chunk_costs_a_retry_on_another(trips_dir: Path, write_job: JobWriter) -> None:
    root = trips_dir.parent
    marker = root / "vanished.marker"
    job, text = vanishing_job(root, write_job, 2, marker)
    marker.touch()  # the reference run: the step lets every chunk through
    run(write_job(text.replace('"dask"', '"serial"').replace("out-dask", "out-serial"), "serial.toml"))
    want = tree_hashes(root / "out-serial")
    for _ in range(ROUNDS):
        marker.unlink()
        summary = guarded_run(job)
        assert marker.exists()  # a worker did vanish mid-chunk
        assert summary.transform["retries"] >= 1, summary.transform
        assert tree_hashes(root / "out-dask") == want


def test_a_chunk_no_worker_is_left_to_run_fails_the_run_naming_it(trips_dir: Path, write_job: JobWriter) -> None:
    from etl.core.errors import ExitCode, WorkerCrashed

    root = trips_dir.parent
    marker = root / "vanished.marker"
    job, text = vanishing_job(root, write_job, 1, marker)
    marker.touch()
    run(write_job(text.replace('"dask"', '"serial"'), "serial.toml"))  # an earlier output, into out-dask
    before = tree_hashes(root / "out-dask")
    for _ in range(ROUNDS):
        marker.unlink()
        with pytest.raises(WorkerCrashed) as info:
            guarded_run(job)
        assert marker.exists()
        error = info.value
        assert error.exit_code == ExitCode.FAILED
        assert "trips-" in error.item and "chunk" in error.item  # names the chunk
        assert "transform.stall_timeout" in error.message and "no worker was on it" in error.message
        assert "attempt 2 of transform.max_attempts = 2" in error.message
        assert tree_hashes(root / "out-dask") == before  # the failed run published nothing


# --------------------------------------------- a frozen worker (issue 21, item 4)
#
# A worker SIGSTOPped while it holds a chunk: its process and sockets are there, so Dask
# sees nothing wrong until its heartbeats are missed for the scheduler's worker-ttl. The
# LocalCluster's is LOCAL_WORKER_TTL (Dask's default, 5 minutes, is past FROZEN_GUARD, so
# a run waiting for it fails here as a hang).

STOPPER = (
    FIRST_DASK_CHUNK
    + '''
def step(df, marker, pids):
    """The first chunk a Dask worker gets freezes that worker (SIGSTOP to itself)."""
    if first_dask_chunk(marker):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\\n")
        os.kill(os.getpid(), signal.SIGSTOP)
    return df
'''
)

FROZEN_GUARD = 150.0  # seconds: 2 x LOCAL_WORKER_TTL and a restart, with room; below Dask's 5 minutes


def thaw_and_kill(pids: Path) -> None:
    """Leave no stopped worker behind: SIGCONT and SIGKILL each pid the step wrote, if it
    is still that stopped process (the nanny normally killed it already)."""
    import psutil

    if not pids.exists():
        return
    for pid in {int(line) for line in pids.read_text().split()}:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_STOPPED:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        except psutil.NoSuchProcess:
            pass


def frozen_runs(
    root: Path, write_job: JobWriter, *settings: str
) -> tuple[list[subprocess.CompletedProcess[str]], dict[str, str]]:
    """ROUNDS real ``run.py`` runs whose step SIGSTOPs its own Dask worker on its first chunk
    (``settings``: ``--set`` overrides); each a subprocess, so a hang fails at FROZEN_GUARD.
    Returns the finished processes and the output of the run before them (serial)."""
    (root / "stopper.py").write_text(STOPPER)
    marker, pids = root / "stopped.marker", root / "stopped.pids"
    step = f'{{op = "python", function = "stopper:step", params = {{marker = "{marker}", pids = "{pids}"}}}},'
    text = job_text('["data/trips-0.csv"]', "dask", out="out-dask").replace(
        "steps = [\n", "steps = [\n  " + step + "\n"
    )
    job = write_job(text, "frozen.toml")
    marker.touch()  # the reference run, into the same output: the step lets every chunk through
    run(write_job(text.replace('"dask"', '"serial"'), "serial.toml"))
    before = tree_hashes(root / "out-dask")
    repo = Path(__file__).resolve().parents[2]
    args = [a for setting in settings for a in ("--set", setting)]
    procs: list[subprocess.CompletedProcess[str]] = []
    for _ in range(ROUNDS):
        marker.unlink()
        try:
            procs.append(
                subprocess.run(
                    [sys.executable, str(repo / "run.py"), "--config", str(job), "--quiet", "--full-refresh", *args],
                    capture_output=True,
                    text=True,
                    timeout=FROZEN_GUARD,  # a hang fails the test here
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
            )
        finally:
            thaw_and_kill(pids)
        assert marker.exists()  # a worker did freeze mid-chunk
    return procs, before


# Each round may wait up to twice the worker TTL (~40 s quiet): three of them pass the suite's
# 120 s on a loaded machine. FROZEN_GUARD per round bounds a real hang instead.
@pytest.mark.timeout(ROUNDS * FROZEN_GUARD + 60)
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param((), id="worker-ttl"),  # only the scheduler's worker-ttl notices (no chunk_timeout)
        # The timed-out chunks' retries must not be scattered to the frozen worker, which is
        # still registered; busy() must not count its tasks, so the watchdog resubmits them.
        pytest.param(("transform.chunk_timeout=3", "transform.stall_timeout=2"), id="chunk-timeout"),
    ],
)
def test_a_frozen_dask_worker_costs_retries_not_the_run(
    trips_dir: Path, write_job: JobWriter, settings: tuple[str, ...]
) -> None:
    """A real run with 2 workers, one SIGSTOPped mid-chunk: exit 0 with the serial run's
    output (before Dask's default 5-minute TTL) and no traceback. 3 runs each."""
    from etl.core.errors import ExitCode

    root = trips_dir.parent
    procs, want = frozen_runs(root, write_job, *settings)
    for proc in procs:
        assert proc.returncode == ExitCode.OK, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    assert tree_hashes(root / "out-dask") == want


def test_a_run_whose_only_dask_worker_froze_fails_naming_the_chunk_without_a_traceback(
    trips_dir: Path, write_job: JobWriter
) -> None:
    """1 worker, SIGSTOPped mid-chunk, chunk_timeout = 2: the attempts time out, the watchdog
    gives up on them, the run exits 1 naming the chunk; no traceback (distributed's abandoned
    sends fail at shutdown), the earlier output untouched. 3 runs."""
    from etl.core.errors import ExitCode

    root = trips_dir.parent
    settings = ("transform.workers=1", "transform.chunk_timeout=2", "transform.stall_timeout=2")
    procs, before = frozen_runs(root, write_job, *settings, "transform.max_attempts=2")
    for proc in procs:
        assert proc.returncode == ExitCode.FAILED, proc.stderr
        assert "trips-0.csv[chunk " in proc.stderr
        assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr, proc.stderr
    assert tree_hashes(root / "out-dask") == before

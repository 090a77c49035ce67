"""The graceful-stop watchdog: a run that cannot stop within ``job.stop_grace_seconds`` after
SIGTERM / SIGINT (or gets a second signal) kills its whole process tree and exits 143 / 130.

Every test starts a real ``python run.py`` whose ``python`` step hangs for good (it sleeps
forever, in the parent's transform thread, in a worker that ignores SIGTERM, or in the
memory probe's worker). "Hung" is known from a marker file the step writes, never from
sleeping; every process of the run carries an environment tag, so one left behind is found
even after it has been re-parented.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import write_trips_csv
from tests.test_cli import layout, leftovers, rows_digest

pytestmark = pytest.mark.timeout(300)  # above the waits below, so they fail with their message

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = str(ROOT / "run.py")
WAIT = 30  # seconds a test waits for a process (a hang, never a timing check)
TAG = "ETL_STOP_TEST_TAG"
HANG_FROM_T1 = 10_000  # trip ids of t1.csv start here; the memory probe reads t0.csv only
NEVER = 10**9

UDF = '''
import json, os, signal, subprocess, sys, time
from pathlib import Path


def hang_on(df, *, marker, hang_from, ignore_sigterm=False, child=False):
    """Hang for good on a chunk holding a trip id >= hang_from; else pass the chunk on."""
    if not (df["trip_id"].astype("int64") >= hang_from).any():
        return df
    if ignore_sigterm:  # like a step stuck in a call that signals do not interrupt
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if child:  # like a step waiting on a tool it started
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]).pid)
    tmp = Path(marker + ".tmp")
    tmp.write_text(json.dumps(pids))
    tmp.replace(marker)
    while True:
        time.sleep(1)
'''


def job_toml(
    *, executor: str, hang_from: int, grace: float, marker: Path, ignore_sigterm: bool = False, child: bool = False
) -> str:
    params = (
        f"{{marker = {json.dumps(str(marker))}, hang_from = {hang_from}, "
        f"ignore_sigterm = {str(ignore_sigterm).lower()}, child = {str(child).lower()}}}"
    )
    return f"""
[job]
name = "stop"
state_dir = "state"
stop_grace_seconds = {grace}

[sources]
urls = ["data/t*.csv"]

[read]
chunk_rows = 100

[transform]
executor = "{executor}"
workers = 1
steps = [{{op = "python", function = "hang_udf:hang_on", params = {params}}}]

[output]
path = "out"
"""


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        write_trips_csv(data / f"t{k}.csv", rows=300, seed=k, start_id=HANG_FROM_T1 * k)
    (tmp_path / "hang_udf.py").write_text(UDF)
    return tmp_path


def run_ok(job_dir: Path) -> None:
    cfg = job_dir / "ok.toml"
    cfg.write_text(job_toml(executor="thread", hang_from=NEVER, grace=20, marker=job_dir / "unused"))
    proc = subprocess.run(
        [sys.executable, RUN_PY, "--config", str(cfg), "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def tag() -> Iterator[str]:
    """The environment tag of the run under test; whatever carries it is killed at the end,
    so a failing test leaves no hung processes behind."""
    value = uuid.uuid4().hex
    yield value
    for p in tagged(value):
        try:
            p.kill()
        except psutil.Error:
            pass


def start_hung_run(job_dir: Path, tag: str, **job: Any) -> tuple[subprocess.Popen[bytes], list[int], Path]:
    """Start the run and return once its step hangs: (process, pids the step reported, log)."""
    marker = job_dir / "hung.json"
    cfg = job_dir / "hang.toml"
    cfg.write_text(job_toml(marker=marker, **job))
    log = job_dir / "run.log"
    cmd = [sys.executable, RUN_PY, "--config", str(cfg), "--quiet", "--log-file", str(log)]
    with open(job_dir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, TAG: tag}
        )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before its step hung: {read(log)}"
        assert time.monotonic() < deadline, f"the step never hung: {read(log)}"
        time.sleep(0.05)
    return proc, json.loads(marker.read_text()), log


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while text not in read(log):
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before logging {text!r}: {read(log)}"
        assert time.monotonic() < deadline, f"never logged {text!r}: {read(log)}"
        time.sleep(0.05)


def tagged(tag: str) -> list[psutil.Process]:
    """Every process started by the run (they inherit its environment), wherever re-parented."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag:
                found.append(p)
        except psutil.Error:  # gone, a zombie, or not ours to read
            pass
    return found


def processes(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def last_report(job_dir: Path) -> dict[str, Any]:
    reports = sorted((job_dir / "state" / "stop" / "reports").glob("run-*.json"))
    return json.loads(reports[-1].read_text())


CASES = {
    # The step hangs in a transform thread of the run itself, and the tool it started hangs
    # too: stopping waits for that thread forever, so only the watchdog can end the run.
    "transform-thread": {"executor": "thread", "hang_from": HANG_FROM_T1, "child": True},
    # The step hangs in a pool worker that ignores SIGTERM.
    "process-worker": {"executor": "process", "hang_from": HANG_FROM_T1, "ignore_sigterm": True},
    # The step hangs in the memory probe's worker, before the pool starts: the cancelled run
    # is over, but asyncio.run still waits for the probe's thread; the watchdog must outlast it.
    "probe": {"executor": "process", "hang_from": 0},
    # The thread executor's chunk is measured in this process (no probe worker): the step hangs
    # in the planner's thread, and only the watchdog can end the run.
    "probe-in-parent": {"executor": "thread", "hang_from": 0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_on_a_hung_step_kills_the_tree_after_the_grace_and_keeps_the_output(
    job_dir: Path, tag: str, case: str
) -> None:
    run_ok(job_dir)
    before = rows_digest(job_dir / "out"), layout(job_dir / "out")
    proc, step_pids, log = start_hung_run(job_dir, tag, grace=1, **CASES[case])
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree or case == "probe-in-parent"  # the hung worker or tool, the probe worker or fork server, ...

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 143, read(log) + read(job_dir / "stderr.txt")

    left = {p.pid: p for p in [*tree, *processes(step_pids), *tagged(tag)] if p.pid != proc.pid}
    _, alive = psutil.wait_procs(list(left.values()), timeout=WAIT)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert tagged(tag) == []
    text = read(log)
    assert "received SIGTERM: stopping (at most 1s" in text
    if case != "process-worker":  # there pebble may end the worker first (SIGKILL after 3 s)
        assert "stopping took longer than 1s (job.stop_grace_seconds): killing child processes" in text
    report = last_report(job_dir)
    assert report["status"] == "interrupted" and report["exit_code"] == 143, read(log) + read(job_dir / "stderr.txt")
    assert (rows_digest(job_dir / "out"), layout(job_dir / "out")) == before  # nothing published

    again = subprocess.run(
        [sys.executable, RUN_PY, "--config", str(job_dir / "ok.toml"), "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert (rows_digest(job_dir / "out"), layout(job_dir / "out")) == before
    assert leftovers(job_dir) == []


def test_a_second_signal_ends_a_hung_run_at_once(job_dir: Path, tag: str) -> None:
    run_ok(job_dir)
    before = rows_digest(job_dir / "out"), layout(job_dir / "out")
    proc, step_pids, log = start_hung_run(job_dir, tag, grace=3600, **CASES["transform-thread"])
    proc.send_signal(signal.SIGINT)
    wait_for_line(log, "received SIGINT: stopping (at most 3600s", proc)
    proc.send_signal(signal.SIGINT)  # the run is stuck stopping: it would wait an hour
    assert proc.wait(WAIT) == 130, read(log) + read(job_dir / "stderr.txt")
    _, alive = psutil.wait_procs([*processes(step_pids), *tagged(tag)], timeout=WAIT)
    assert alive == [], f"left behind: {[(p.pid, p.name()) for p in alive]}"
    assert "received SIGINT again: killing child processes and exiting with 130" in read(log)
    report = last_report(job_dir)
    assert report["status"] == "interrupted" and report["exit_code"] == 130
    assert (rows_digest(job_dir / "out"), layout(job_dir / "out")) == before


HUNG_LAST_WORDS = """
import sys, time
from pathlib import Path
from etl.run import stopping

stopping.LAST_WORDS_SECONDS = 0.5
report = Path(sys.argv[1])
calls = []


def write_report_or_hang(signum, why):
    calls.append(why)
    if len(calls) > 1:  # the disk hangs by the time the last words come
        while True:
            time.sleep(1)
    report.write_text(f"{signum} {why}")


with stopping.GracefulStop(1, write_report_or_hang):
    Path(sys.argv[2]).write_text("")
    while True:  # a step that never returns
        time.sleep(1)
"""


def test_the_report_is_written_when_the_signal_comes_and_hung_last_words_show_where(tmp_path: Path) -> None:
    report, ready = tmp_path / "report.txt", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", HUNG_LAST_WORDS, str(report), str(ready)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert report.read_text() == "15 stopping (at most 1s, job.stop_grace_seconds)"
    assert "in write_report_or_hang" in err  # the stuck last words' stack, on stderr


@pytest.mark.parametrize("value", ["0", "-1", "inf", '"soon"'])
def test_stop_grace_seconds_must_be_a_positive_number(job_dir: Path, value: str) -> None:
    cfg = job_dir / "ok.toml"
    cfg.write_text(job_toml(executor="thread", hang_from=NEVER, grace=20, marker=job_dir / "unused"))
    proc = subprocess.run(
        [sys.executable, RUN_PY, "validate", "--config", str(cfg), "--set", f"job.stop_grace_seconds={value}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "job.stop_grace_seconds" in proc.stderr

"""The workers' fork server, started early by the command line (real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter: the server is a per-process singleton, and pytest's own may be running.
PROBE = """
import multiprocessing.forkserver as fs, psutil, sys
from etl.core.forkserver import start_early, WORKER_MODULE
start_early()
server = fs._forkserver._forkserver_pid
assert server is not None and 'etl.transform.worker' not in sys.modules  # we did not import it
from etl.transform.executors import mp_context
ctx = mp_context()
proc = ctx.Process(target=print)
proc.start(); proc.join()
assert fs._forkserver._forkserver_pid == server  # the pool's workers come from the early server
print(psutil.Process(server).cmdline()[-1], proc.exitcode)
"""


def test_start_early_starts_the_server_the_workers_then_come_from() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(" 0"), done.stdout  # the worker ran and exited cleanly


def test_a_run_of_a_process_job_starts_the_server_before_importing_pandas(tmp_path: Path) -> None:
    """``load_and_check(for_run=True)`` starts the server right after reading the job file,
    so its preload overlaps the parent's own imports; a thread job, or one whose budget
    leaves no room for worker processes, gets none."""
    code = """
import multiprocessing.forkserver as fs, sys
from pathlib import Path
from etl.cli import load_and_check
job = Path(sys.argv[1])
(job.parent / "x.csv").write_text("a\\n1\\n")
job.write_text('[job]\\nname = "s"\\n[sources]\\nurls = ["x.csv"]\\n[transform]\\nexecutor = "EXEC"\\n[resources]\\nmemory_limit = "LIMIT"\\n[output]\\npath = "out"\\n')
import etl.core.config
real = etl.core.config.load_job
def load_job(*a, **k):
    cfg = real(*a, **k)
    print("pandas loaded before the server:", "pandas" in sys.modules)
    return cfg
etl.core.config.load_job = load_job
load_and_check(job, [], for_run=True)
print("server:", fs._forkserver._forkserver_pid is not None)
"""
    # 300 MiB: the planner will run the steps in threads (no room for worker processes), so
    # no server is started whose memory the budget could not afford.
    for executor, limit, server in (
        ("process", "2GiB", "True"),
        ("thread", "2GiB", "False"),
        ("process", "300MiB", "False"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                code.replace("EXEC", executor).replace("LIMIT", limit),
                str(tmp_path / f"{executor}-{limit}.toml"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "pandas loaded before the server: False" in done.stdout
        assert f"server: {server}" in done.stdout, (executor, limit, done.stdout)

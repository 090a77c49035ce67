"""Measuring one engine run: wall time, CPU seconds and peak RSS of its whole process tree.

``measure(cmd)`` starts ``cmd`` as a subprocess and returns a ``Measurement``:

* **wall**: from start until the command's own process exits.
* **CPU seconds** (user + sys) of every process the command started, however deep, even
  ones that outlive their parent: this process makes itself a *child subreaper*
  (``PR_SET_CHILD_SUBREAPER``), so orphans (a forkserver, pool workers, a Dask nanny's
  worker) are re-parented here and reaped by us, and the kernel then adds their times to
  ``getrusage(RUSAGE_CHILDREN)``. Sampling ``cpu_times`` instead would miss what a worker
  spends after the last sample; ``/usr/bin/time`` misses every process not waited for.
* **peak RSS**: the largest sum of RSS over the tree, sampled every ``SAMPLE_SECONDS``
  with psutil from a thread of this process (shared pages count once per process, so this
  over-counts fork-shared memory a little, like any RSS sum).

Helpers also start and stop the benchmark's HTTP server (``etl.ops.serve`` in a child process,
or nginx: ``serve(folder, kind)``) and describe the machine.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.1  # RSS sampling period: shorter catches brief peaks, costs the machine more
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Measurement:
    wall: float
    cpu: float
    peak_rss: int
    returncode: int
    output: str  # stdout + stderr, for the log and for error messages


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process, so their CPU time is counted."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


class _TreeSampler(threading.Thread):
    """Sum of RSS over this process's descendants (minus ``exclude``), sampled until stopped."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self._exclude = exclude
        self._stop_event = threading.Event()
        self.peak = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self._stop_event.is_set():
            total = 0
            for p in me.children(recursive=True):
                if p.pid in self._exclude:
                    continue
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    pass  # it ended between the listing and the read
            self.peak = max(self.peak, total)
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _reap_orphans(exclude: set[int], timeout: float) -> None:
    """Wait for descendants re-parented to us (a forkserver exits when its parent has gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in psutil.Process().children() if p.pid not in exclude]
        if not left:
            return
        for p in left:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    p.kill()  # a leaked daemon: do not let it spoil the next engine's figures
                    remaining = 5.0
                p.wait(remaining)  # psutil reaps our own children, so rusage is collected
            except psutil.TimeoutExpired:
                pass
            except psutil.NoSuchProcess:
                pass


def measure(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    exclude: set[int] = frozenset(),  # type: ignore[assignment]
    timeout: float = 3600.0,
    cwd: Path = REPO,
) -> Measurement:
    """Run ``cmd`` to completion; figures cover it and every process it started."""
    exclude = set(exclude)
    _reap_orphans(exclude, timeout=10.0)  # leftovers from an earlier run must not count here
    cpu_before = _children_cpu()
    sampler = _TreeSampler(exclude)
    start = time.perf_counter()
    # Output goes to a file, not a pipe: a pipe would make us wait for every process that
    # inherited it, and wall time is the command's own.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        sampler.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log.write(f"\n[benchmark] killed after {timeout}s\n")
        wall = time.perf_counter() - start
        sampler.stop()
        _reap_orphans(exclude, timeout=30.0)
        log.seek(0)
        output = log.read()
    return Measurement(wall, _children_cpu() - cpu_before, sampler.peak, proc.returncode, output)


# ------------------------------------------------------------------------- server


class Server:
    """``python run.py serve FOLDER --port 0`` in a child process; ``url`` once it listens."""

    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "run.py", "serve", str(folder), "--port", "0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the server prints its address
        m = re.search(r"http://[\w.\[\]:]+", line)
        if m is None:
            self.proc.kill()
            raise RuntimeError(f"the file server did not start: {line!r}")
        self.url = m.group(0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


NGINX_CONF = """
daemon off;
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
"""
NGINX_START_S = 10.0  # how long nginx may take to listen before the benchmark gives up


class NginxServer(Server):
    """nginx serving ``folder`` on a free loopback port; ``url``, ``pid`` and ``stop`` as ``Server``.

    nginx sends files with ``sendfile``: next to no CPU, as a remote server would take
    from this machine's cores (the Python server uses most of a core while it sends)."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.root = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        (self.root / "tmp").mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        user = "user root;" if os.geteuid() == 0 else ""
        (self.root / "nginx.conf").write_text(
            NGINX_CONF.format(root=self.root, port=port, www=folder.resolve(), user=user)
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.root / "nginx.conf"), "-e", str(self.root / "error.log")], stderr=subprocess.PIPE
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline, delay = time.monotonic() + NGINX_START_S, 0.005
        while True:  # readiness: connect, backing off, until it listens or has died
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"nginx did not start: {(self.root / 'error.log').read_text(errors='replace')}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)


def serve(folder: Path, kind: str) -> Server | NginxServer:
    """The benchmark's HTTP server: ``nginx`` or ``etl`` (``run.py serve``)."""
    return NginxServer(folder) if kind == "nginx" else Server(folder)


def default_server() -> str:
    return "nginx" if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else "etl"


# ------------------------------------------------------------------------ machine

CEILING_LOOP = "x = 0\nfor i in range(20_000_000): x += i"  # ~1 s of pure CPU, no memory traffic


def parallel_ceiling(workers: int, tries: int = 3) -> float:
    """How many times one process's CPU work ``workers`` processes get done in the same time.

    A VM's vCPUs may be hyperthreads or be contended: this is the most any engine's
    ``workers``-way scaling can show on this machine (ideal: ``workers``).
    """

    def wall(n: int) -> float:
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", CEILING_LOOP]) for _ in range(n)]
        for p in procs:
            p.wait()
        return time.perf_counter() - started

    ratios = []
    for _ in range(tries):
        one = wall(1)
        ratios.append(workers * one / wall(workers))
    return round(sorted(ratios)[len(ratios) // 2], 2)


def machine() -> dict[str, object]:
    import pandas
    import pyarrow

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "pandas": pandas.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": __import__("numpy").__version__,
        **_optional_versions(),
    }


def _optional_versions() -> dict[str, str]:
    out = {}
    for name in ("dask", "distributed", "duckdb"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out

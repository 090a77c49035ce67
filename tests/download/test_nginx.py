"""The download stage against a real nginx (Debian's) on 127.0.0.1: Range, If-Range, 304.

aiohttp's own server is scripted for faults elsewhere; this checks that what the stage
sends is understood by a production server. Skipped when nginx is not installed
(``.ci/run`` installs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from etl.core.config import DownloadConfig
from etl.core.queues import BoundedQueue
from etl.core.records import Source, StagedFile
from etl.download.stage import download_stage
from tests.conftest import nginx_binary

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")

# Workers run as the test's own user: pytest's tmp folders are private (0700).
CONF = """
daemon off;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
  log_format combined_range '$status $request_method $uri range=$http_range';
  access_log {root}/access.log combined_range;
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """Serve ``www/`` with nginx; yields (base URL, www folder, access log)."""
    root, www = tmp_path / "nginx", tmp_path / "www"
    (root / "tmp").mkdir(parents=True)
    www.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "nginx.conf").write_text(
        CONF.format(root=root, port=port, www=www, user="user root;" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen(
        [NGINX, "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")], stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}", www, root / "access.log"
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], limit: float = 10.0) -> None:
    """Readiness probe: connect with doubling back-off until nginx listens (or has died)."""
    delay, deadline = 0.005, time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    pytest.fail(f"nginx did not listen on port {port} within {limit}s")


def make_file(path: Path, size: int) -> str:
    data = hashlib.sha256(b"seed").digest() * (size // 32 + 1)
    path.write_bytes(data[:size])
    return hashlib.sha256(data[:size]).hexdigest()


async def stage(sources: list[Source], staging: Path, state: Path) -> tuple[list[StagedFile], dict]:
    q: BoundedQueue[StagedFile] = BoundedQueue("files", 100, 1 << 40)
    stats = await download_stage(sources, DownloadConfig(), staging, q, state_file=state)
    return [s async for s in q], stats.as_dict()


def access_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


async def test_download_from_nginx_verifies_checksums(nginx: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, www, _ = nginx
    sums = {f"part-{i}.csv": make_file(www / f"part-{i}.csv", 300_000 + i) for i in range(3)}
    sources = [Source(i, f"{base}/{n}", n, "csv", sha256=s) for i, (n, s) in enumerate(sums.items())]
    staged, stats = await stage(sources, tmp_path / "staging", tmp_path / "state.json")
    assert sorted(s.source.name for s in staged) == sorted(sums)
    for s in staged:
        assert hashlib.sha256(s.path.read_bytes()).hexdigest() == sums[s.source.name]
    assert stats["files"] == 3 and stats["retries"] == 0


async def test_partial_file_resumes_with_range_from_nginx(nginx: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, www, log = nginx
    digest = make_file(www / "big.csv", 1_000_000)
    url = f"{base}/big.csv"
    etag = urllib.request.urlopen(urllib.request.Request(url, method="HEAD")).headers["ETag"]
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "big.csv.part").write_bytes((www / "big.csv").read_bytes()[:400_000])  # an earlier run's half
    (staging / "big.csv.part.json").write_text(json.dumps({"url": url, "etag": etag, "last_modified": None}))
    staged, stats = await stage([Source(0, url, "big.csv", "csv", sha256=digest)], staging, tmp_path / "s.json")
    assert hashlib.sha256(staged[0].path.read_bytes()).hexdigest() == digest
    assert stats["resumed_bytes"] == 400_000
    assert "206 GET /big.csv range=bytes=400000-" in access_lines(log)


async def test_changed_file_restarts_instead_of_appending(nginx: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, www, log = nginx
    url = f"{base}/data.csv"
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "data.csv.part").write_bytes(b"x" * 1000)  # from an older version of the file
    (staging / "data.csv.part.json").write_text(json.dumps({"url": url, "etag": '"old-etag"', "last_modified": None}))
    digest = make_file(www / "data.csv", 50_000)
    staged, _ = await stage([Source(0, url, "data.csv", "csv")], staging, tmp_path / "s.json")
    assert hashlib.sha256(staged[0].path.read_bytes()).hexdigest() == digest  # If-Range failed: full body
    assert "200 GET /data.csv range=bytes=1000-" in access_lines(log)


async def test_rerun_gets_304_and_fetches_no_body(nginx: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, www, log = nginx
    make_file(www / "a.csv", 20_000)
    sources = [Source(0, f"{base}/a.csv", "a.csv", "csv")]
    await stage(sources, tmp_path / "staging", tmp_path / "state.json")
    staged, stats = await stage(sources, tmp_path / "staging", tmp_path / "state.json")
    assert staged[0].unchanged and stats["not_modified"] == 1 and stats["bytes"] == 0
    assert access_lines(log)[-1] == "304 GET /a.csv range=-"

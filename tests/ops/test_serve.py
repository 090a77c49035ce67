"""The local file server, over real sockets: bodies, ranges, validators, refusals, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from etl.core.errors import ConfigError
from etl.ops.serve import serve, start_server

pytestmark = pytest.mark.timeout(30)

DATA = bytes(range(256)) * 1200  # 300 KiB: more than one disk read per response
GZ = b"\x1f\x8b\x08\x00fake gzip bytes"


@pytest.fixture
def www(tmp_path: Path) -> Path:
    folder = tmp_path / "www"
    (folder / "sub").mkdir(parents=True)
    (folder / "data.bin").write_bytes(DATA)
    (folder / "sub" / "trips.csv.gz").write_bytes(GZ)
    (folder / "sub" / "trips.csv").write_bytes(b"plain")  # a gzip sibling must not replace it
    (folder / ".trips.csv.part").write_bytes(b"half")
    (folder / "empty.csv").write_bytes(b"")
    (tmp_path / "secret.txt").write_bytes(b"top secret")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    return folder


async def get(url: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, r.headers.copy(), await r.read()


async def raw_get(base_url: str, path: str) -> tuple[int, bytes]:
    """Send the path exactly as written (clients normalise ``..`` away)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_get_sends_the_file_with_length_and_validators(www: Path) -> None:
    async with serve(www) as url:
        status, headers, body = await get(f"{url}/data.bin")
    assert (status, body) == (200, DATA)
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"') and headers["Last-Modified"].endswith("GMT")


async def test_compressed_files_are_sent_as_stored_bytes(www: Path) -> None:
    # No Content-Encoding, or the client would unzip and the checksum would not match.
    async with serve(www) as url:
        status, headers, body = await get(f"{url}/sub/trips.csv.gz")
        _, _, plain = await get(f"{url}/sub/trips.csv", **{"Accept-Encoding": "gzip"})
    assert (status, body) == (200, GZ)
    assert headers["Content-Type"] == "application/gzip"
    assert "Content-Encoding" not in headers
    assert plain == b"plain"


async def test_head_answers_headers_without_a_body(www: Path) -> None:
    async with serve(www) as url, aiohttp.ClientSession() as s:
        async with s.head(f"{url}/data.bin") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(DATA))
            assert await r.read() == b""


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=100-199", 100, 200),
        ("bytes=1000-", 1000, len(DATA)),
        ("bytes=-50", len(DATA) - 50, len(DATA)),
        ("bytes=0-999999999", 0, len(DATA)),
    ],
)
async def test_range_gets_206_with_exactly_those_bytes(www: Path, header: str, start: int, stop: int) -> None:
    async with serve(www) as url:
        status, headers, body = await get(f"{url}/data.bin", Range=header)
    assert (status, body) == (206, DATA[start:stop])
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"
    assert headers["Content-Length"] == str(stop - start)


async def test_range_past_the_end_gets_416_and_odd_ranges_get_the_whole_file(www: Path) -> None:
    async with serve(www) as url:
        status, headers, _ = await get(f"{url}/data.bin", Range=f"bytes={len(DATA)}-")
        assert (status, headers["Content-Range"]) == (416, f"bytes */{len(DATA)}")
        status, _, _ = await get(f"{url}/empty.csv", Range="bytes=0-")
        assert status == 416
        for odd in ("bytes=0-1,5-6", "lines=1-2", "bytes=9-3"):
            status, _, body = await get(f"{url}/data.bin", Range=odd)
            assert (status, body) == (200, DATA), odd


async def test_if_range_resumes_only_an_unchanged_file(www: Path) -> None:
    async with serve(www) as url:
        _, headers, _ = await get(f"{url}/data.bin")
        etag, modified = headers["ETag"], headers["Last-Modified"]
        resumed = await get(f"{url}/data.bin", Range="bytes=10-19", **{"If-Range": etag})
        by_date = await get(f"{url}/data.bin", Range="bytes=10-19", **{"If-Range": modified})
        stale = await get(f"{url}/data.bin", Range="bytes=10-19", **{"If-Range": '"old-1"'})
        old_date = formatdate(0, usegmt=True)
        too_old = await get(f"{url}/data.bin", Range="bytes=10-19", **{"If-Range": old_date})
    assert resumed[0] == by_date[0] == 206 and resumed[2] == by_date[2] == DATA[10:20]
    assert stale[0] == too_old[0] == 200 and stale[2] == too_old[2] == DATA


async def test_conditional_get_answers_304_until_the_file_changes(www: Path) -> None:
    async with serve(www) as url:
        _, headers, _ = await get(f"{url}/data.bin")
        etag, modified = headers["ETag"], headers["Last-Modified"]
        status, h304, body = await get(f"{url}/data.bin", **{"If-None-Match": etag})
        assert (status, body, h304["ETag"]) == (304, b"", etag)
        status, _, _ = await get(f"{url}/data.bin", **{"If-Modified-Since": modified})
        assert status == 304
        status, _, _ = await get(f"{url}/data.bin", **{"If-None-Match": '"other"'})
        assert status == 200
        status, _, _ = await get(f"{url}/data.bin", **{"If-Match": '"other"'})
        assert status == 412

        (www / "data.bin").write_bytes(DATA[::-1])
        later = (www / "data.bin").stat().st_mtime + 5
        os.utime(www / "data.bin", (later, later))
        status, changed, body = await get(f"{url}/data.bin", **{"If-None-Match": etag})
    assert (status, body) == (200, DATA[::-1])
    assert changed["ETag"] != etag


async def test_missing_files_folders_and_dot_files_are_404(www: Path) -> None:
    async with serve(www) as url:
        for path in ("/nope.csv", "/sub", "/", "/.trips.csv.part"):
            status, body = await raw_get(url, path)
            assert status == 404, path
            assert b"half" not in body


@pytest.mark.parametrize(
    "path",
    ["/../secret.txt", "/%2e%2e/secret.txt", "/sub/..%2F..%2Fsecret.txt", "/link.txt", "/%2Fetc%2Fpasswd"],
)
async def test_paths_leaving_the_folder_are_refused(www: Path, path: str) -> None:
    async with serve(www) as url:
        status, body = await raw_get(url, path)
    assert status == 403
    assert b"top secret" not in body and b"root:" not in body


async def test_latency_and_bandwidth_keep_content_intact(www: Path) -> None:
    small = DATA[:40_000]
    (www / "small.bin").write_bytes(small)
    async with serve(www, latency=0.01, bandwidth=400_000) as url:
        status, _, body = await get(f"{url}/small.bin")
        assert (status, body) == (200, small)
        status, _, body = await get(f"{url}/small.bin", Range="bytes=1000-30999")
        assert (status, body) == (206, small[1000:31000])


async def test_bad_options_raise_config_error_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory") as e:
        await start_server(tmp_path / "missing")
    assert e.value.item == "folder"
    with pytest.raises(ConfigError, match="-1") as e:
        await start_server(tmp_path, latency=-1)
    assert e.value.item == "latency"
    with pytest.raises(ConfigError, match="0") as e:
        await start_server(tmp_path, bandwidth=0)
    assert e.value.item == "bandwidth"


async def test_a_port_in_use_is_a_clear_error(www: Path) -> None:
    async with serve(www) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}") as e:
            await start_server(www, port=port)
    assert e.value.item == "port"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_run_forever_prints_its_url_and_stops_cleanly_on_a_signal(www: Path, sig: signal.Signals) -> None:
    code = f"from etl.ops.serve import run_forever; run_forever({str(www)!r}, port=0)"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        status, _, body = await get(f"{url}/data.bin")
        assert (status, body) == (200, DATA)
        proc.send_signal(sig)
        rest = await asyncio.wait_for(proc.stdout.read(), 10)
        assert await proc.wait() == 0
        assert b"stopped" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

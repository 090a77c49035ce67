"""etl.download.http: the source check and the head fetch, against real servers on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from etl.core.config import DownloadConfig
from etl.core.records import Source
from etl.download.http import check_sources, client_session, fetch_head
from tests.http_server import ScriptedServer, Status

CFG = DownloadConfig.model_validate({"timeout": {"connect": 5, "read": 5}})


def src(url: str, index: int = 0, name: str = "a.csv", headers: tuple[tuple[str, str], ...] = ()) -> Source:
    return Source(index, url, name, "csv", headers=headers)


def free_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "srv"
    d.mkdir()
    (d / "a.csv").write_bytes(b"id,x\n1,2\n")
    (d / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, every offset distinguishable
    return d


@pytest.fixture
async def server(folder: Path) -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(folder) as srv:
        yield srv


async def ranged_server(folder: Path, statuses: list[int]) -> web.AppRunner:
    """aiohttp's static handler: honours ``Range: bytes=a-b`` with a 206 (statuses recorded)."""

    async def record(request: web.Request, resp: web.StreamResponse) -> None:
        statuses.append(resp.status)  # as sent: the static handler picks 200 or 206 in prepare()

    app = web.Application()
    app.on_response_prepare.append(record)
    app.router.add_static("/", folder)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def base_of(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


# ------------------------------------------------------------------- check_sources


async def test_check_sources_ok_and_404(server: ScriptedServer) -> None:
    result = await check_sources(CFG, [src(server.url("a.csv")), src(server.url("missing.csv"), 1, "m.csv")])
    assert result == [None, "HTTP 404"]
    assert [h.method for h in server.hits_for("a.csv")] == ["HEAD"]
    assert [h.method for h in server.hits_for("missing.csv")] == ["HEAD"]


@pytest.mark.parametrize("code", [405, 501])
async def test_check_sources_falls_back_to_a_one_byte_get(folder: Path, code: int) -> None:
    async with ScriptedServer(folder, {"a.csv": [Status(code)]}) as srv:
        assert await check_sources(CFG, [src(srv.url("a.csv"))]) == [None]
    hits = srv.hits_for("a.csv")
    assert [(h.method, h.status) for h in hits] == [("HEAD", code), ("GET", 200)]
    assert hits[1].headers.get("Range") == "bytes=0-0"


async def test_check_sources_reports_the_get_status_when_the_fallback_fails(folder: Path) -> None:
    async with ScriptedServer(folder, {"a.csv": [Status(405), Status(403)]}) as srv:
        assert await check_sources(CFG, [src(srv.url("a.csv"))]) == ["HTTP 403"]
    assert [h.method for h in srv.hits_for("a.csv")] == ["HEAD", "GET"]


async def test_check_sources_other_errors_are_not_retried_with_get(folder: Path) -> None:
    async with ScriptedServer(folder, {"a.csv": [Status(500)]}) as srv:
        assert await check_sources(CFG, [src(srv.url("a.csv"))]) == ["HTTP 500"]
    assert [h.method for h in srv.hits_for("a.csv")] == ["HEAD"]


async def test_check_sources_sends_job_and_source_headers(server: ScriptedServer) -> None:
    cfg = DownloadConfig.model_validate({"headers": {"X-Job": "j", "X-Both": "job"}})
    source = src(server.url("a.csv"), headers=(("X-Src", "s"), ("X-Both", "source")))
    assert await check_sources(cfg, [source]) == [None]
    (hit,) = server.hits_for("a.csv")
    assert (hit.headers["X-Job"], hit.headers["X-Src"], hit.headers["X-Both"]) == ("j", "s", "source")


async def test_check_sources_local_paths(tmp_path: Path) -> None:
    there = tmp_path / "here.csv"
    there.write_text("a\n1\n")
    sources = [src(str(there)), src(str(tmp_path / "gone.csv"), 1, "gone.csv"), src(str(tmp_path), 2, "dir")]
    assert await check_sources(CFG, sources) == [None, "local file not found", "local file not found"]


async def test_check_sources_unreachable_port_gives_error_without_secrets() -> None:
    port = free_port()
    url = f"http://alice:s3cr3t-pw@127.0.0.1:{port}/data.csv?token=tok-123456&x=1"
    (error,) = await check_sources(CFG, [src(url)])
    assert error is not None and error != ""
    assert not error.startswith("HTTP ")
    assert "s3cr3t-pw" not in error
    assert "tok-123456" not in error
    assert "alice" not in error


async def test_check_sources_mixed_list_keeps_order(server: ScriptedServer, tmp_path: Path) -> None:
    port = free_port()
    sources = [
        src(server.url("missing.csv"), 0, "m.csv"),
        src(str(tmp_path / "nope.csv"), 1, "nope.csv"),
        src(server.url("a.csv"), 2),
        src(f"http://127.0.0.1:{port}/x.csv", 3, "x.csv"),
    ]
    result = await check_sources(CFG, sources)
    assert result[:3] == ["HTTP 404", "local file not found", None]
    assert isinstance(result[3], str) and result[3]


async def test_check_sources_of_nothing_is_empty() -> None:
    assert await check_sources(CFG, []) == []


# ----------------------------------------------------------------------- fetch_head


async def test_fetch_head_from_server_that_ignores_range(server: ScriptedServer, folder: Path) -> None:
    whole = (folder / "big.bin").read_bytes()
    for limit in (1, 1000, 65536, 65537, 300_000):
        head = await fetch_head(CFG, src(server.url("big.bin"), name="big.bin"), limit)
        assert head == whole[:limit], limit
    hits = server.hits_for("big.bin")
    assert all(h.status == 200 for h in hits)  # the whole body was offered each time
    assert hits[0].headers["Range"] == "bytes=0-0"
    assert hits[2].headers["Range"] == "bytes=0-65535"
    assert all(h.headers.get("Accept-Encoding") == "identity" for h in hits)


async def test_fetch_head_from_server_that_honours_range(folder: Path) -> None:
    whole = (folder / "big.bin").read_bytes()
    statuses: list[int] = []
    runner = await ranged_server(folder, statuses)
    try:
        base = base_of(runner)
        for limit in (1, 4096, 100_000):
            assert await fetch_head(CFG, src(f"{base}/big.bin", name="big.bin"), limit) == whole[:limit]
    finally:
        await runner.cleanup()
    assert statuses == [206, 206, 206]


async def test_fetch_head_of_a_file_shorter_than_limit_is_the_whole_file(server: ScriptedServer, folder: Path) -> None:
    assert await fetch_head(CFG, src(server.url("a.csv")), 1 << 20) == (folder / "a.csv").read_bytes()


async def test_fetch_head_raises_for_an_error_status(server: ScriptedServer) -> None:
    with pytest.raises(aiohttp.ClientResponseError) as info:
        await fetch_head(CFG, src(server.url("missing.csv")), 100)
    assert info.value.status == 404


async def test_fetch_head_raises_for_an_unreachable_server() -> None:
    with pytest.raises((aiohttp.ClientError, TimeoutError, OSError)):
        await fetch_head(CFG, src(f"http://127.0.0.1:{free_port()}/x.csv"), 100)


async def test_fetch_head_does_not_decompress_gzip_bodies(folder: Path) -> None:
    import gzip

    raw = gzip.compress(b"id,x\n" + b"1,2\n" * 10_000)
    (folder / "t.csv.gz").write_bytes(raw)

    async def gzipped(request: web.Request) -> web.Response:
        # A server that labels the body with Content-Encoding: the bytes must still arrive as sent.
        return web.Response(body=raw, headers={"Content-Encoding": "gzip", "Content-Type": "text/csv"})

    app = web.Application()
    app.router.add_get("/t.csv.gz", gzipped)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        head = await fetch_head(CFG, src(f"{base_of(runner)}/t.csv.gz", name="t.csv.gz"), 50)
    finally:
        await runner.cleanup()
    assert head == raw[:50]


# ------------------------------------------------------------------ client_session


async def test_client_session_carries_the_job_limits() -> None:
    cfg = DownloadConfig.model_validate({"concurrency": 3, "per_host": 2, "timeout": {"connect": 1.5, "read": 7}})
    async with client_session(cfg) as session:
        assert session.connector is not None
        assert session.connector.limit == 3
        assert session.connector.limit_per_host == 2
        assert session.timeout.total is None
        assert session.timeout.sock_connect == 1.5
        assert session.timeout.sock_read == 7
        assert session.auto_decompress is False
        assert session.trust_env is True
    async with client_session(cfg, force_close=True) as session:
        assert session.connector is not None and session.connector.force_close


async def test_check_sources_error_that_quotes_the_url_quotes_it_redacted() -> None:
    url = "http://alice:s3cr3t-pw@127.0.0.1:99999/data.csv?token=tok-123456"  # port out of range
    (error,) = await check_sources(CFG, [src(url)])
    assert error is not None
    assert "127.0.0.1:99999/data.csv" in error  # the URL is named...
    assert "s3cr3t-pw" not in error and "tok-123456" not in error  # ...without its secrets


async def test_check_sources_unparseable_url_is_reported_per_source(server: ScriptedServer) -> None:
    result = await check_sources(CFG, [src("http://alice:pw-999@[::1/x.csv"), src(server.url("a.csv"), 1)])
    assert isinstance(result[0], str) and "pw-999" not in result[0]
    assert result[1] is None

"""The download stage (its queue, slots and dispatch) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from etl.core.records import Source
from tests.download.runs import FAST, Sink, payload, remote, run, sha
from tests.http_server import (
    Drop,
    Gate,
    ScriptedServer,
    serve_folder_in_thread,
)

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------- concurrency


@pytest.mark.parametrize(("concurrency", "per_host", "expected"), [(8, 2, 2), (1, 4, 1)])
async def test_concurrent_requests_never_exceed_the_limits(
    site: Path, staging: Path, concurrency: int, per_host: int, expected: int
) -> None:
    for k in range(6):
        (site / f"p{k}.csv").write_bytes(payload(2000, seed=k))
    cfg = FAST.model_copy(update={"concurrency": concurrency, "per_host": per_host})
    async with ScriptedServer(site, hold=0.05) as srv:
        sources = [remote(srv.url(f"p{k}.csv"), f"p{k}.csv", index=k) for k in range(6)]
        stats, staged = await run(sources, staging, cfg)
    assert srv.max_in_flight == expected
    assert sorted(s.source.index for s in staged) == list(range(6)) and stats.files == 6


# ------------------------------------------------------------------- local sources


async def test_local_sources_pass_straight_through(tmp_path: Path, staging: Path) -> None:
    local = tmp_path / "local.csv"
    local.write_bytes(b"id\n1\n2\n")
    sink = Sink()
    stats, [staged] = await run(
        [Source(0, str(local), "local.csv", "csv", sha256=sha(b"id\n1\n2\n"))], staging, progress=sink
    )
    assert staged.path == local and staged.size == 7 and not staged.unchanged
    assert list(staging.iterdir()) == []  # no copy
    assert stats.files == 1 and stats.bytes == 0 and sink.items == 1


async def test_mixed_sources_all_arrive_and_progress_counts_bytes(site: Path, staging: Path, tmp_path: Path) -> None:
    (site / "r.csv").write_bytes(payload(30_000))
    local = tmp_path / "l.csv"
    local.write_bytes(b"id\n")
    sink = Sink()
    async with ScriptedServer(site, {"r.csv": [Drop(0.5)]}) as srv:
        sources = [Source(0, str(local), "l.csv", "csv"), remote(srv.url("r.csv"), "r.csv", index=1)]
        stats, staged = await run(sources, staging, progress=sink)
    assert {s.source.name for s in staged} == {"l.csv", "r.csv"}
    assert sink.items == 2 and sink.nbytes == stats.bytes == 30_000  # 15 000 + the resumed 15 000
    assert stats.as_dict()["files"] == 2
    assert not any(p.name.endswith(".part") for p in staging.iterdir())
    assert os.path.getsize(staging / "r.csv") == 30_000


async def test_head_gets_headers_only_so_a_kept_alive_connection_stays_in_step(site: Path) -> None:
    data = payload(50_000)
    (site / "a.csv").write_bytes(data)
    async with ScriptedServer(site) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", urlsplit(srv.base_url).port)
        writer.write(b"HEAD /a.csv HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GET /a.csv HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        rest = await reader.read()  # everything until the server closes
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 200 ") and f"Content-Length: {len(data)}\r\n".encode() in head
    assert rest.startswith(b"HTTP/1.1 200 ")  # the GET's answer, not body bytes of the HEAD
    assert rest.partition(b"\r\n\r\n")[2] == data
    assert [(h.method, h.status, h.body_bytes) for h in srv.hits] == [("HEAD", 200, 0), ("GET", 200, len(data))]


def test_server_in_a_thread_serves_a_folder_for_subprocess_tests(site: Path) -> None:
    (site / "a.csv").write_bytes(b"id\n1\n")
    base_url, stop = serve_folder_in_thread(site)
    try:
        with urllib.request.urlopen(f"{base_url}/a.csv", timeout=5) as resp:
            assert resp.read() == b"id\n1\n"
    finally:
        stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base_url}/a.csv", timeout=5)


# ------------------------------------------------------------------ sizes told early


async def test_sizes_are_told_before_the_body_ends_and_a_304_or_chunked_file_is_not_named(
    site: Path, staging: Path, tmp_path: Path
) -> None:
    """``sized`` hears each size while its body is still held by the server: Content-Length
    (a), the whole size from a resumed 206's Content-Range (b, cut once), a checksummed local
    file's size (c). A chunked body (d) has no size to tell; a 304 on a rerun tells none."""
    data = {name: payload(30_000 + 1000 * k, seed=k) for k, name in enumerate(("a.csv", "b.csv", "d.csv"))}
    for name, body in data.items():
        (site / name).write_bytes(body)
    local = tmp_path / "c.csv"
    local.write_bytes(b"id\n1\n")
    told: list[tuple[str, int]] = []
    everything = asyncio.Event()

    def sized(src: Source, nbytes: int) -> None:
        told.append((src.name, nbytes))
        names = [n for n, _ in told]
        if {"a.csv", "c.csv"} <= set(names) and names.count("b.csv") == 2:  # b: its 200, then its 206
            everything.set()

    state = tmp_path / "state" / "sources.json"
    async with ScriptedServer(site) as srv:
        gates = {"a.csv": Gate(everything), "d.csv": Gate(everything, chunked=True)}
        srv_b_gate = Gate(everything)
        srv.scripts = {"a.csv": [gates["a.csv"]], "b.csv": [Drop(0.5), srv_b_gate], "d.csv": [gates["d.csv"]]}
        sources = [remote(srv.url(n), n, k) for k, n in enumerate(("a.csv", "b.csv", "d.csv"))]
        sources.append(Source(3, str(local), "c.csv", "csv", sha256=sha(b"id\n1\n")))
        _, staged = await run(sources, staging, sized=sized, state_file=state)
        assert everything.is_set() and not any(g.timed_out for g in [*gates.values(), srv_b_gate])
        assert sorted(set(told)) == [("a.csv", 30_000), ("b.csv", 31_000), ("c.csv", 5)]  # b twice: both attempts
        assert {f.source.name: f.size for f in staged} == {
            "a.csv": 30_000,
            "b.csv": 31_000,
            "c.csv": 5,
            "d.csv": 32_000,
        }
        told.clear()
        _, again = await run(sources[:3], staging, sized=sized, state_file=state)
    assert all(f.unchanged for f in again) and told == []

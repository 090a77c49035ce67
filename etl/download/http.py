"""The HTTP client, set up once for every request this tool makes.

``client_session`` is the one place aiohttp sessions are made: the download stage's, the
source check of ``validate --check-sources`` (``check_sources``) and the planner's look
at the head of a remote source (``fetch_head``) all get the job's timeouts, connection
limits and proxy settings (``trust_env``: ``HTTP(S)_PROXY``, ``NO_PROXY``, ``~/.netrc``,
as other tools on the host), and bodies as sent (no transparent decompression: a
``.gz`` source is staged as the bytes the server holds).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from etl.core.config import DownloadConfig
from etl.core.records import Source
from etl.core.redact import redact_url


def client_session(cfg: DownloadConfig, *, force_close: bool = False) -> aiohttp.ClientSession:
    """A session with the job's limits and timeouts (connect, and the gap between reads;
    no total: a large file may take as long as it takes while bytes keep coming).
    ``force_close``: one connection per request (see ``check_sources``)."""
    timeout = aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=cfg.timeout.connect, sock_read=cfg.timeout.read
    )
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=cfg.per_host, force_close=force_close)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False, trust_env=True)


async def check_sources(cfg: DownloadConfig, sources: list[Source]) -> list[str | None]:
    """HEAD every remote source (a one-byte GET where HEAD is not allowed), stat every local
    one: ``None`` per source that answers, else what went wrong (secrets redacted)."""
    # One connection per probe: a server that sends a body after HEAD (some do) would
    # otherwise corrupt the next response on a kept-alive connection.
    async with client_session(cfg, force_close=True) as session:

        async def probe(src: Source) -> str | None:
            if not src.is_remote:
                return None if Path(src.url).is_file() else "local file not found"
            headers = {**cfg.headers, **dict(src.headers)}
            try:
                async with session.head(src.url, headers=headers, allow_redirects=True) as resp:
                    status = resp.status
                if status in (405, 501):  # no HEAD support: ask for one byte instead
                    async with session.get(src.url, headers={**headers, "Range": "bytes=0-0"}) as resp:
                        status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: a URL yarl cannot parse
                return f"{type(e).__name__}: {e}".replace(src.url, redact_url(src.url))
            return None if status < 400 else f"HTTP {status}"

        return await asyncio.gather(*(probe(s) for s in sources))


async def fetch_head(cfg: DownloadConfig, src: Source, limit: int) -> bytes:
    """The first ``limit`` bytes of a remote source, as stored (a Range GET; from a server
    that ignores Range, the rest is never read). Raises ``aiohttp.ClientError``,
    ``TimeoutError`` or ``OSError`` when it cannot be had."""
    headers = {**cfg.headers, **dict(src.headers), "Accept-Encoding": "identity", "Range": f"bytes=0-{limit - 1}"}
    async with client_session(cfg) as session, session.get(src.url, headers=headers) as resp:
        resp.raise_for_status()
        head = bytearray()
        async for piece in resp.content.iter_chunked(1 << 16):
            head += piece
            if len(head) >= limit:
                break
        return bytes(head[:limit])


async def ask_not_modified(cfg: DownloadConfig, asks: list[tuple[Source, dict[str, str]]]) -> list[bool | None]:
    """A conditional HEAD per ``(source, validators)``, as the run's conditional GET would
    ask: True for a 304 (the run reuses its copy), False for a 2xx (the run downloads),
    None when the server cannot tell (an error, no HEAD support, a failed request)."""
    async with client_session(cfg, force_close=True) as session:  # see check_sources

        async def ask(src: Source, validators: dict[str, str]) -> bool | None:
            headers = {**cfg.headers, **dict(src.headers), "Accept-Encoding": "identity", **validators}
            try:
                async with session.head(src.url, headers=headers, allow_redirects=True) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None
            return True if status == 304 else False if 200 <= status < 300 else None

        return await asyncio.gather(*(ask(s, v) for s, v in asks))

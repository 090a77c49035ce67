"""Serve a folder's files over HTTP: a stand-in data publisher for benchmarks and tests.

In: a folder, and optionally an added latency per request and a bandwidth cap per response.
Out: an aiohttp server (127.0.0.1 and a free port by default) answering ``GET``/``HEAD
/<path relative to the folder>`` the way a static file host does:

* ``200`` with Content-Length, a strong ETag, Last-Modified and ``Accept-Ranges: bytes``;
* ``206`` for a single ``Range: bytes=…`` (``416`` when it starts past the end), honouring
  ``If-Range`` given as an ETag *or* a date (aiohttp's FileResponse reads only the date
  form, and would splice a stale resume onto a changed file);
* ``304`` for a matching ``If-None-Match`` or an unchanged ``If-Modified-Since``; ``412``
  for a failed ``If-Match``/``If-Unmodified-Since``;
* ``404`` for missing files, folders and dot-files (``.x.part`` temp files); ``403`` for a
  path that leaves the folder (``..``, symlinks out).

Files go out as stored bytes: ``x.csv.gz`` is ``application/gzip`` with no Content-Encoding,
so a client saves exactly the file (and its checksum matches).

``start_server`` is for in-process use (tests, ``bench``), ``serve`` wraps it as an async
context manager, ``run_forever`` is the ``run.py serve`` command.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import signal
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from etl.core.errors import ConfigError

# Bytes read from disk per write: larger means fewer awaits, more memory per response.
READ_BYTES = 256 * 1024
# Throttled responses write bandwidth/20 bytes every 50 ms: a smoother rate vs. more wakeups.
PACE_STEPS_PER_SECOND = 20

# Types for the formats the pipeline reads; other names fall back to ``mimetypes``.
CONTENT_TYPES = {
    ".csv": "text/csv",
    ".jsonl": "application/jsonl",
    ".gz": "application/gzip",
    ".parquet": "application/vnd.apache.parquet",
    ".zst": "application/zstd",
}


@dataclass(frozen=True)
class _Options:
    folder: Path
    latency: float
    bandwidth: int | None


_OPTIONS = web.AppKey("options", _Options)


def make_app(folder: Path, *, latency: float = 0.0, bandwidth: int | None = None) -> web.Application:
    """The aiohttp application serving ``folder``. Raises ``ConfigError`` for bad options."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"the folder to serve must exist and be a directory, got {str(folder)!r}", key="folder")
    if latency < 0:
        raise ConfigError(f"latency must be >= 0 seconds, got {latency!r}", key="latency")
    if bandwidth is not None and bandwidth <= 0:
        raise ConfigError(f"bandwidth must be > 0 bytes/s, got {bandwidth!r}", key="bandwidth")
    app = web.Application()
    app[_OPTIONS] = _Options(folder.resolve(), latency, bandwidth)
    app.router.add_get("/{path:.*}", _handle)  # add_get also routes HEAD
    return app


async def start_server(
    folder: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    latency: float = 0.0,
    bandwidth: int | None = None,
) -> tuple[web.AppRunner, str]:
    """Start serving; return the runner (``await runner.cleanup()`` stops it) and base URL."""
    runner = web.AppRunner(make_app(folder, latency=latency, bandwidth=bandwidth), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}", key="port") from None
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"


@asynccontextmanager
async def serve(
    folder: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    latency: float = 0.0,
    bandwidth: int | None = None,
) -> AsyncIterator[str]:
    """``async with serve(folder) as base_url:`` — the server stops when the block ends."""
    runner, base_url = await start_server(folder, host=host, port=port, latency=latency, bandwidth=bandwidth)
    try:
        yield base_url
    finally:
        await runner.cleanup()


def run_forever(
    folder: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    latency: float = 0.0,
    bandwidth: int | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then close connections and return."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with serve(folder, host=host, port=port, latency=latency, bandwidth=bandwidth) as url:
            limit = f", {bandwidth} bytes/s per response" if bandwidth else ""
            print(f"serving {folder} at {url} (latency {latency}s{limit}); Ctrl+C stops", flush=True)
            await stop.wait()
        print("stopped", flush=True)

    asyncio.run(main())


# ------------------------------------------------------------------------ handler


async def _handle(request: web.Request) -> web.StreamResponse:
    opts = request.app[_OPTIONS]
    if opts.latency:
        await asyncio.sleep(opts.latency)
    loop = asyncio.get_running_loop()
    fobj, st = await loop.run_in_executor(None, _open, opts.folder, request.match_info["path"])
    try:
        return await _respond(request, fobj, st, opts.bandwidth)
    finally:
        fobj.close()


def _open(folder: Path, rel: str) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file inside ``folder``; the stat comes from the open file, so the
    validators describe exactly the bytes that are sent."""
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder):
        raise web.HTTPForbidden(text=f"{rel!r} is outside the served folder\n")
    if any(part.startswith(".") for part in target.relative_to(folder).parts):
        raise web.HTTPNotFound(text=f"{rel!r} is not served (dot-files are private)\n")
    try:
        fobj = open(target, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise web.HTTPNotFound(text=f"no file {rel!r}\n") from None
    st = os.fstat(fobj.fileno())
    if not stat.S_ISREG(st.st_mode):
        fobj.close()
        raise web.HTTPNotFound(text=f"{rel!r} is not a regular file\n")
    return fobj, st


async def _respond(
    request: web.Request, fobj: BinaryIO, st: os.stat_result, bandwidth: int | None
) -> web.StreamResponse:
    etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
    mtime = int(st.st_mtime)  # HTTP dates have whole seconds
    status = _preconditions(request, etag, mtime)
    if status is not None:
        answer = web.Response(status=status)  # no body; a 412 says Content-Length: 0
        answer.etag, answer.last_modified = etag, mtime
        return answer
    rng = _byte_range(request, st.st_size, etag, mtime)
    start, stop = rng or (0, st.st_size)
    resp = web.StreamResponse(status=200 if rng is None else 206)
    if rng is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{st.st_size}"
    resp.etag, resp.last_modified = etag, mtime
    resp.headers["Accept-Ranges"] = "bytes"
    resp.content_type = _content_type(request.match_info["path"])
    resp.content_length = stop - start
    await resp.prepare(request)
    if request.method != "HEAD":
        await _send(resp, fobj, start, stop, bandwidth)
    await resp.write_eof()
    return resp


def _preconditions(request: web.Request, etag: str, mtime: int) -> int | None:
    """412 or 304 per RFC 9110 §13.2.2 (ETags win over dates), else None."""
    if request.if_match is not None:
        if not any(t.value in ("*", etag) and not t.is_weak for t in request.if_match):
            return 412
    elif request.if_unmodified_since is not None:
        if mtime > request.if_unmodified_since.timestamp():
            return 412
    if request.if_none_match is not None:
        if any(t.value in ("*", etag) for t in request.if_none_match):
            return 304
    elif request.if_modified_since is not None:
        if mtime <= request.if_modified_since.timestamp():
            return 304
    return None


def _byte_range(request: web.Request, size: int, etag: str, mtime: int) -> tuple[int, int] | None:
    """``(start, stop)`` of the one range to send, or None to send the whole file (200).

    A malformed or multi-part Range is ignored (RFC 9110 §14.2 allows it); one that cannot
    be satisfied gets 416 with ``Content-Range: bytes */size``.
    """
    if request.method != "GET" or not _range_applies(request, etag, mtime):
        return None
    try:
        rng = request.http_range
    except ValueError:
        return None
    if rng.start is None:
        return None
    if size == 0 or rng.start >= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    if rng.start < 0:  # suffix range: the last N bytes
        return max(0, size + rng.start), size
    return rng.start, min(size, rng.stop if rng.stop is not None else size)


def _range_applies(request: web.Request, etag: str, mtime: int) -> bool:
    """Without If-Range, always; with it, only if the client's copy is still current."""
    validator = request.headers.get("If-Range")
    if validator is None:
        return True
    if validator.startswith(('"', "W/")):
        return validator == f'"{etag}"'  # strong comparison: weak tags never match
    since = request.if_range
    return since is not None and int(since.timestamp()) == mtime


async def _send(resp: web.StreamResponse, fobj: BinaryIO, start: int, stop: int, bandwidth: int | None) -> None:
    """Write bytes ``start..stop``; with a bandwidth, paced to ``bandwidth`` bytes/s."""
    loop = asyncio.get_running_loop()
    piece = READ_BYTES if bandwidth is None else max(1, bandwidth // PACE_STEPS_PER_SECOND)
    began = time.monotonic()
    offset = start
    while offset < stop:
        want = min(piece, stop - offset)
        data = await loop.run_in_executor(None, os.pread, fobj.fileno(), want, offset)
        if not data:
            break  # the file shrank while being sent; the client sees a short body
        await resp.write(data)
        offset += len(data)
        if bandwidth is not None:
            # Sleep until the bytes sent so far are due: the rate holds even when the
            # disk read or the socket write took part of the step.
            due = began + (offset - start) / bandwidth
            await asyncio.sleep(max(0.0, due - time.monotonic()))


def _content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"

"""A real HTTP server on 127.0.0.1 for tests: serves a folder, with scripted faults per path.

``ScriptedServer(folder, scripts)`` serves ``folder/<path>`` like a static file server
(``ETag`` from the content, ``Last-Modified`` from the mtime, ``Range`` + ``If-Range``,
``If-None-Match`` / ``If-Modified-Since`` → 304; ``HEAD`` gets a ``GET``'s headers and no
body). ``scripts`` maps a path to a list of faults consumed one per request; once a path's
script is used up it is served normally::

    async with ScriptedServer(tmp_path, {"a.csv": [Status(503), Drop(0.5)]}) as srv:
        url = srv.url("a.csv")
        ...
    srv.hits_for("a.csv")  # what the server saw: method, headers, status, body bytes

For subprocess tests, ``serve_folder_in_thread(folder)`` runs one on its own event loop
in a background thread and returns ``(base_url, stop)``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

BODY_PIECE = 16 * 1024  # bytes per write, so faults can cut a body mid-way
DROP_GRACE = 0.5  # seconds between the last byte and a Drop's close: aiohttp discards bytes
# a client has buffered but not yet read when the connection breaks, so without it the cut
# could land anywhere before the bytes sent; with it, loopback clients read them all. 0.05 s
# was not enough at load average 15-20 (a client kept 0 bytes and sent no Range); 9 Drops
# in the suite make 0.5 s cost about 5 s.


@dataclass(frozen=True)
class Status:
    """Answer with this status (and headers) and a short body instead of the file."""

    code: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stall:
    """Send the headers (and ``after_bytes`` of the body), then send nothing more."""

    after_bytes: int = 0


@dataclass(frozen=True)
class Drop:
    """Send the headers and ``fraction`` of the (possibly ranged) body, then close the connection."""

    fraction: float = 0.5


@dataclass(frozen=True)
class Mutate:
    """Replace the file's content (new ETag and mtime), then serve this request normally."""

    content: bytes


@dataclass(frozen=True)
class RangeFrom:
    """Answer a ``Range`` request with a 206 from byte ``start``, not from where it asked (a
    broken server or cache); a request without ``Range`` is served normally."""

    start: int


@dataclass(frozen=True)
class Gate:
    """Send the headers (and the body's first byte), then hold the rest until ``release`` is set (at most ``timeout``
    seconds, then send it anyway and note the path in ``timed_out``); ``chunked``: chunked
    transfer, no ``Content-Length``."""

    release: asyncio.Event
    timeout: float = 10.0
    chunked: bool = False
    timed_out: list[str] = field(default_factory=list)


Fault = Status | Stall | Drop | Mutate | RangeFrom | Gate


@dataclass
class Hit:
    """One request as the server saw it."""

    path: str
    method: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0


class ScriptedServer:
    def __init__(self, folder: Path, scripts: dict[str, list[Fault]] | None = None, *, hold: float = 0.0) -> None:
        self.folder = Path(folder)
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.hold = hold  # seconds each request waits before answering, so requests overlap
        self.hits: list[Hit] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()  # release stalled handlers
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ScriptedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------------- queries

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    @property
    def body_bytes(self) -> int:
        return sum(h.body_bytes for h in self.hits)

    # -------------------------------------------------------------------- serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        hit = Hit(path, request.method, dict(request.headers))
        self.hits.append(hit)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            script = self.scripts.get(path)
            fault = script.pop(0) if script else None
            if isinstance(fault, Status):
                hit.status = fault.code
                return web.Response(status=fault.code, headers=fault.headers, text=f"scripted {fault.code}")
            if isinstance(fault, Mutate):
                (self.folder / path).write_bytes(fault.content)
            return await self._serve_file(request, hit, fault)
        finally:
            self.in_flight -= 1

    async def _serve_file(self, request: web.Request, hit: Hit, fault: Fault | None) -> web.StreamResponse:
        file = self.folder / _path_inside(request.match_info["path"])
        if not file.is_file():
            hit.status = 404
            return web.Response(status=404, text="not found")
        data = file.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        mtime = int(file.stat().st_mtime)
        validators = {"ETag": etag, "Last-Modified": email.utils.formatdate(mtime, usegmt=True)}
        if _not_modified(request, etag, mtime):
            hit.status = 304
            return web.Response(status=304, headers=validators)
        start = _range_start(request, etag, validators["Last-Modified"])
        if isinstance(fault, RangeFrom) and start is not None:
            start = fault.start
        if start is not None and start >= len(data):
            hit.status = 416
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        resp = web.StreamResponse(status=206 if start is not None else 200, headers=validators)
        if start is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start or 0 :]
        if isinstance(fault, Gate) and fault.chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(body)  # for HEAD too: the length a GET would send
        hit.status = resp.status
        await resp.prepare(request)
        if request.method == "HEAD":  # headers only: aiohttp sends whatever a handler writes
            body = b""
        return await self._send_body(request, resp, hit, body, fault)

    async def _send_body(
        self, request: web.Request, resp: web.StreamResponse, hit: Hit, body: bytes, fault: Fault | None
    ) -> web.StreamResponse:
        cut = len(body)
        if isinstance(fault, Gate):
            await resp.write(body[:1])  # aiohttp sends the headers with the first bytes
            hit.body_bytes += len(body[:1])
            body = body[1:]
            cut = len(body)
            try:
                await asyncio.wait_for(fault.release.wait(), fault.timeout)
            except TimeoutError:
                fault.timed_out.append(hit.path)
        if isinstance(fault, Drop):
            cut = int(len(body) * fault.fraction)
        elif isinstance(fault, Stall):
            cut = fault.after_bytes
        for i in range(0, cut, BODY_PIECE):
            piece = body[i : min(i + BODY_PIECE, cut)]
            await resp.write(piece)
            hit.body_bytes += len(piece)
        if isinstance(fault, Stall):
            assert self._stopping is not None
            await self._stopping.wait()
            _close(request)
        elif isinstance(fault, Drop):
            await asyncio.sleep(DROP_GRACE)
            _close(request)
        else:
            await resp.write_eof()
        return resp


def _path_inside(path: str) -> str:
    if ".." in Path(path).parts:
        raise web.HTTPForbidden()
    return path


def _close(request: web.Request) -> None:
    """Close the connection after flushing what was written: the client sees a short body."""
    if request.transport is not None:
        request.transport.close()


def _not_modified(request: web.Request, etag: str, mtime: int) -> bool:
    if (inm := request.headers.get("If-None-Match")) is not None:
        return etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*"
    if (ims := request.headers.get("If-Modified-Since")) is not None:
        try:
            return mtime <= email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            return False
    return False


def _range_start(request: web.Request, etag: str, last_modified: str) -> int | None:
    """Start of a ``Range: bytes=N-`` request still valid under ``If-Range``; None for the whole file."""
    m = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", "").strip())
    if not m:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range not in (etag, last_modified):
        return None  # the file changed: send all of it
    return int(m.group(1))


# ------------------------------------------------------------------ background thread


def serve_folder_in_thread(
    folder: Path, scripts: dict[str, list[Fault]] | None = None
) -> tuple[str, Callable[[], None]]:
    """Start a ``ScriptedServer`` on its own loop in a daemon thread; returns (base_url, stop)."""
    started: threading.Event = threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        server = ScriptedServer(folder, scripts)
        box["loop"], box["server"] = loop, server
        try:
            box["url"] = loop.run_until_complete(server.start())
        except BaseException as e:  # surfaced to the caller below
            box["error"] = e
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())
        loop.close()

    thread = threading.Thread(target=run, name="test-http-server", daemon=True)
    thread.start()
    started.wait(timeout=10)
    if "error" in box:
        raise RuntimeError("test HTTP server failed to start") from box["error"]  # type: ignore[arg-type]

    def stop() -> None:
        loop: asyncio.AbstractEventLoop = box["loop"]  # type: ignore[assignment]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    return str(box["url"]), stop

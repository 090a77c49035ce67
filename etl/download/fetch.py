"""Staging one source: a local file checked in place, or a remote file fetched whole.

``Transfer`` fetches one remote (HTTP) source for the download stage (``etl.download.stage``,
which owns the queues and the slots a transfer runs under); ``stage_local`` passes a local
file through. What a transfer returns is a ``StagedFile`` whose body is on disk at
``staging_dir/<name>``, fsynced and verified; ``FetchContext`` is what the transfers of one
stage run share (session, config, staging folder, state file, statistics, progress).

Per remote file: retries with full-jitter exponential backoff (tenacity) on connection
errors, timeouts, 408, 429 and 5xx, honouring ``Retry-After``; bodies stream to
``<name>.part`` and resume with ``Range`` + ``If-Range`` (validators kept in
``<name>.part.json`` so a later run can resume too; see ``etl.download.partial``). An
answer that cannot continue the ``.part`` (a ``206`` starting elsewhere than asked, a
``416``) discards it and restarts from byte 0 at once, without using up an attempt; a
``416`` to a ``.part`` exactly as long as the file is taken as the file only when the
source's checksum says so (a run that died before the rename). With a ``state_file``, a rerun sends ``If-None-Match``/``If-Modified-Since`` and a
304 reuses the previous run's staged file (so ``staging_dir`` must outlive the run; this
module never deletes staged files, only ``.part`` leftovers it cannot resume).

Known limits: requests say ``Accept-Encoding: identity`` and bodies are stored as sent (no
decompression), so a server that gzips anyway yields its gzip bytes. When a connection
breaks, aiohttp drops bytes it had buffered but not yet handed over (at most its read
buffer), so a resume restarts from the last byte actually written, a little earlier.

Tenacity, not stamina: stamina's jitter is added on top of the exponential delay (not
"full jitter") and its retry hooks are process-global, while tenacity has full jitter
(``wait_random_exponential``), per-call ``before_sleep`` logging and ``stop_before_delay``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from etl.core import durable
from etl.core.config import DownloadConfig
from etl.core.errors import ChecksumMismatch, ETLError, SourceError
from etl.core.records import Source, StagedFile
from etl.core.redact import _secret_values, redact_url
from etl.core.stats import ProgressSink
from etl.download.checksums import (
    checksum_problem,
    hash_file,
    hexdigests,
    new_hashers,
    write_and_hash,
)
from etl.download.partial import PartFile
from etl.download.source_state import SourceState, conditional_headers

log = logging.getLogger("etl.download")

SizeSink = Callable[[Source, int], None]
"""Told a source's size (bytes as stored) as soon as the download stage knows it."""

RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_DEFAULT_HEADERS = {"Accept-Encoding": "identity"}  # the staged bytes must be the file itself


@dataclass
class DownloadStats:
    files: int = 0
    """Files put on the queue (local, downloaded and not modified)."""
    bytes: int = 0
    """Body bytes received over the network, failed attempts included."""
    retries: int = 0
    resumed_bytes: int = 0
    """Bytes not fetched again thanks to a ``Range`` resume."""
    not_modified: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FetchContext:
    """What the fetches of one stage run share: session, config, staging folder, state file,
    statistics, and where progress and early sizes are told."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        cfg: DownloadConfig,
        staging_dir: Path,
        state: SourceState,
        full_refresh: bool,
        stats: DownloadStats,
        progress: ProgressSink | None,
        sized: SizeSink | None = None,
    ) -> None:
        self.session = session
        self.cfg = cfg
        self.staging_dir = staging_dir
        self.state = state
        self.full_refresh = full_refresh
        self.stats = stats
        self.progress = progress
        self.sized = sized

    def report(self, items: int = 0, nbytes: int = 0) -> None:
        if self.progress is not None:
            self.progress.update(items=items, nbytes=nbytes)

    def expect(self, src: Source, nbytes: int | None) -> None:
        """Tell ``sized`` the size of ``src`` before it is staged (when it is known)."""
        if self.sized is not None and nbytes is not None:
            self.sized(src, nbytes)


# ----------------------------------------------------------------------- retry-after


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class _TransientStatus(SourceError):
    """A retryable HTTP status; carries the server's ``Retry-After`` for the backoff."""

    def __init__(self, message: str, *, item: str, status: int, retry_after: float | None) -> None:
        super().__init__(message, item=item, retryable=True, status=status)
        self.retry_after = retry_after


class _Restart(Exception):
    """The answer cannot continue the ``.part``, which is discarded: ask again from byte 0, in
    the same attempt (a restart is not a failure, and must not use up ``retry.attempts``)."""


def _content_range(value: str) -> tuple[int | None, int | None]:
    """``(first byte, complete length)`` of ``Content-Range: bytes a-b/n``; None where unknown."""
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None, None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


# ------------------------------------------------------------------- local sources


def local_size(src: Source) -> int | None:
    try:
        return Path(src.url).stat().st_size
    except OSError:
        return None  # stage_local names the problem


async def stage_local(src: Source) -> StagedFile:
    """A local file goes through as it is; it is read (hashed) only when it has a checksum."""
    path = Path(src.url)
    try:
        if not (src.sha256 or src.md5):
            return StagedFile(src, path, (await asyncio.to_thread(path.stat)).st_size)
        hashers = new_hashers(src)
        size = await asyncio.to_thread(hash_file, path, hashers)
    except FileNotFoundError:
        raise SourceError(f"local file not found: {path}", item=src.url) from None
    except OSError as e:
        raise SourceError(f"cannot read local file: {e}", item=src.url) from e
    digests = hexdigests(hashers)
    if problem := checksum_problem(src, digests):
        raise ChecksumMismatch(problem, item=src.url)
    return StagedFile(src, path, size, sha256=digests["sha256"])


# --------------------------------------------------------------------- one transfer


class Transfer:
    """One remote source: its attempts, its ``.part`` file and its validators."""

    def __init__(self, fetcher: FetchContext, src: Source) -> None:
        self.f = fetcher
        self.src = src
        self.safe_url = redact_url(src.url)
        self.ident = fetcher.state.ident(src.url)  # how state files name it: no secret in clear
        self.headers: CIMultiDict[str] = CIMultiDict(_DEFAULT_HEADERS)
        self.headers.update(fetcher.cfg.headers)
        self.headers.update(dict(src.headers))
        self._secrets = _secret_values(src.url, self.headers)
        self.partial = PartFile(fetcher.staging_dir, src.name, self.ident)
        self.final = self.partial.final
        self.part = self.partial.part
        self.attempts = 0

    def scrub(self, text: str) -> str:
        text = text.replace(self.src.url, self.safe_url)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _extra(self, **more: Any) -> dict[str, Any]:
        return {"stage": "download", "source": self.src.name, "url": self.safe_url, **more}

    async def run(self) -> StagedFile:
        r = self.f.cfg.retry
        jitter = wait_random_exponential(multiplier=r.backoff, max=r.backoff_max)

        def wait(rs: RetryCallState) -> float:
            err = rs.outcome.exception() if rs.outcome else None
            if isinstance(err, _TransientStatus) and err.retry_after is not None:
                return min(err.retry_after, r.backoff_max)
            return jitter(rs)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(r.attempts) | stop_before_delay(r.max_time),
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, SourceError) and e.retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        total = self.f.cfg.timeout.total
        deadline = asyncio.timeout(total)
        try:
            async with deadline:
                return await retrying(self._attempt)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise SourceError(
                f"took longer than download.timeout.total = {total}s ({self.attempts} attempts)",
                item=self.safe_url,
                retryable=True,
                attempts=self.attempts,
            ) from None
        except SourceError as e:
            raise self._give_up(e) from e.__cause__

    def _log_retry(self, rs: RetryCallState) -> None:
        err = rs.outcome.exception() if rs.outcome else None
        reason = err.message if isinstance(err, ETLError) else repr(err)
        delay = rs.next_action.sleep if rs.next_action else 0.0
        self.f.stats.retries += 1
        log.warning(
            "retry %s in %.2fs: attempt %d of %d failed: %s",
            self.safe_url,
            delay,
            rs.attempt_number,
            self.f.cfg.retry.attempts,
            reason,
            extra=self._extra(attempt=rs.attempt_number, delay=delay, reason=reason),
        )

    def _give_up(self, err: SourceError) -> SourceError:
        n = self.attempts
        tries = f"{n} attempt{'s' if n != 1 else ''}"
        if isinstance(err, ChecksumMismatch):
            return ChecksumMismatch(f"{err.message} (after {tries})", item=self.safe_url, attempts=n)
        if err.retryable:
            message = f"gave up after {tries}; last error: {err.message}"
        else:
            message = f"{err.message} (not retried; {tries})"
        return SourceError(message, item=self.safe_url, retryable=err.retryable, status=err.status, attempts=n)

    # --------------------------------------------------------------- one attempt

    async def _attempt(self) -> StagedFile:
        self.attempts += 1
        offset, validator = await asyncio.to_thread(self.partial.resume_point)
        try:
            try:
                return await self._request(offset, validator)
            except _Restart:  # the .part is gone: start over now, in the same attempt (a
                return await self._request(0, None)  # request without Range cannot restart)
        except (aiohttp.InvalidURL, aiohttp.TooManyRedirects, aiohttp.ClientConnectorCertificateError) as e:
            raise SourceError(self.scrub(f"{type(e).__name__}: {e}"), item=self.safe_url) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise SourceError(self._describe(e), item=self.safe_url, retryable=True) from None
        except OSError as e:  # the staging disk, not the network: full, read-only, ...
            raise SourceError(f"cannot write {self.part}: {e}", item=self.safe_url) from e

    async def _request(self, offset: int, validator: str | None) -> StagedFile:
        conditional = {} if offset else self._conditional_headers()
        headers = CIMultiDict(self.headers)
        headers.update(conditional)
        if offset and validator:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        async with self.f.session.get(self.src.url, headers=headers) as resp:
            return await self._receive(resp, offset, bool(conditional))

    def _describe(self, e: BaseException) -> str:
        if isinstance(e, aiohttp.SocketTimeoutError):
            return f"read timed out: no data for {self.f.cfg.timeout.read}s (download.timeout.read)"
        if isinstance(e, aiohttp.ConnectionTimeoutError):
            return f"connect timed out after {self.f.cfg.timeout.connect}s (download.timeout.connect)"
        return self.scrub(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    async def _receive(self, resp: aiohttp.ClientResponse, offset: int, conditional: bool) -> StagedFile:
        status = resp.status
        if status == 304 and conditional:
            return self._not_modified()
        if status in RETRY_STATUSES:
            raise _TransientStatus(
                f"HTTP {status} {resp.reason or ''}".strip(),
                item=self.safe_url,
                status=status,
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            )
        if status == 416 and offset:
            return await self._unsatisfiable(resp, offset)
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if offset and start == offset:
                self.f.stats.resumed_bytes += offset
            elif start == 0:  # the file from its first byte, whatever we asked: a fresh start
                if offset:
                    log.info(
                        "%s: asked for bytes %d- but got Content-Range %r; restarting with it",
                        self.safe_url,
                        offset,
                        resp.headers.get("Content-Range"),
                        extra=self._extra(),
                    )
                offset = 0
                await asyncio.to_thread(self.partial.write_meta, resp.headers)
            elif offset:  # a range we did not ask for: never splice it onto our bytes
                log.warning(
                    "%s: asked for bytes %d- but got Content-Range %r; restarting from byte 0",
                    self.safe_url,
                    offset,
                    resp.headers.get("Content-Range"),
                    extra=self._extra(),
                )
                await asyncio.to_thread(self.partial.discard)
                raise _Restart
            else:
                raise SourceError(
                    f"HTTP 206 with Content-Range {resp.headers.get('Content-Range')!r} "
                    "to a request for the whole file",
                    item=self.safe_url,
                    retryable=True,
                    status=status,
                )
        elif status in (200, 203):
            if offset:
                log.info(
                    "%s: server sent the whole file (changed, or no range support); restarting",
                    self.safe_url,
                    extra=self._extra(),
                )
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            await asyncio.to_thread(self.partial.write_meta, resp.headers)
        else:
            raise SourceError(f"HTTP {status} {resp.reason or ''}".strip(), item=self.safe_url, status=status)
        self.f.expect(self.src, total)  # the whole file's size (206: Content-Range's), before its body
        return await self._stream(resp, offset, total)

    async def _unsatisfiable(self, resp: aiohttp.ClientResponse, offset: int) -> StagedFile:
        """416 to ``Range: bytes=<offset>-``: the ``.part`` is at least as long as the file. If
        it is exactly as long (``Content-Range: bytes */<offset>``) and the source has a
        checksum that the ``.part`` matches, it is the whole file (a run that died between
        the last byte and the rename); anything else is stale, and restarts from byte 0."""
        m = re.fullmatch(r"bytes \*/(\d+)", resp.headers.get("Content-Range", "").strip())
        if m and int(m.group(1)) == offset and (self.src.sha256 or self.src.md5):
            hashers = new_hashers(self.src)
            await asyncio.to_thread(hash_file, self.part, hashers, offset)
            digests = hexdigests(hashers)
            if not checksum_problem(self.src, digests):
                log.info(
                    "%s: HTTP 416: the partial file already holds all %d bytes, checksum verified",
                    self.safe_url,
                    offset,
                    extra=self._extra(),
                )
                meta = await asyncio.to_thread(self.partial.read_meta)
                validators = {"ETag": meta.get("etag"), "Last-Modified": meta.get("last_modified")}
                return await self._finish(offset, digests, validators)
        log.info(
            "%s: HTTP 416 for bytes %d-: the partial file is stale; restarting from byte 0",
            self.safe_url,
            offset,
            extra=self._extra(),
        )
        await asyncio.to_thread(self.partial.discard)
        raise _Restart

    async def _stream(self, resp: aiohttp.ClientResponse, offset: int, total: int | None) -> StagedFile:
        hashers = new_hashers(self.src)
        if offset:
            await asyncio.to_thread(hash_file, self.part, hashers, offset)
        chunk = self.f.cfg.chunk_bytes
        size = offset
        f: IO[bytes] = await asyncio.to_thread(self.partial.open, offset)
        buf = bytearray()
        try:
            async for piece in resp.content.iter_chunked(chunk):
                buf += piece
                size += len(piece)
                self.f.stats.bytes += len(piece)
                self.f.report(nbytes=len(piece))
                if len(buf) >= chunk:
                    data, buf = buf, bytearray()
                    await asyncio.to_thread(write_and_hash, f, data, hashers)
        finally:
            # Keep what did arrive: the next attempt resumes after it.
            await asyncio.to_thread(write_and_hash, f, buf, hashers)
            await asyncio.to_thread(durable.close_synced, f)
        if total is not None and size != total:
            if size > total:
                await asyncio.to_thread(self.partial.discard)
            raise SourceError(f"incomplete body: received {size} of {total} bytes", item=self.safe_url, retryable=True)
        digests = hexdigests(hashers)
        if problem := checksum_problem(self.src, digests):
            await asyncio.to_thread(self.partial.discard)
            raise ChecksumMismatch(problem, item=self.safe_url)
        return await self._finish(size, digests, resp.headers)

    async def _finish(self, size: int, digests: dict[str, str], headers: Mapping[str, str | None]) -> StagedFile:
        """The verified ``.part`` becomes the staged file; its validators are remembered."""
        await asyncio.to_thread(self.partial.publish)
        self._remember(size, digests, headers)
        await self.f.state.save(throttle=True)
        return StagedFile(self.src, self.final, size, sha256=digests["sha256"])

    # ----------------------------------------------------------- incremental

    def _conditional_headers(self) -> dict[str, str]:
        if self.f.full_refresh:
            return {}
        return conditional_headers(self.f.state.entries.get(self.ident), self.final, self.src)

    def _not_modified(self) -> StagedFile:
        self.f.stats.not_modified += 1
        entry = self.f.state.entries[self.ident]
        log.info("%s: not modified, reusing %s", self.safe_url, self.final, extra=self._extra())
        return StagedFile(self.src, self.final, entry["size"], unchanged=True, sha256=entry.get("sha256"))

    def _remember(self, size: int, digests: dict[str, str], headers: Mapping[str, str | None]) -> None:
        self.f.state.entries[self.ident] = {
            "name": self.src.name,
            "etag": headers.get("ETag"),
            "last_modified": headers.get("Last-Modified"),
            "size": size,
            **digests,
        }

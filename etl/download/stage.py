"""The download stage: sources in, verified local files out.

Queues and flow::

    list[Source] ──► admission window ──► one task per source ──► files queue
    (expanded at     (concurrency x       aiohttp session,       (out: the pipeline's
     start-up)        ADMISSION_PER_SLOT)  per-host limits        BoundedQueue[StagedFile],
                                                                  closed here)

* **In**: the expanded ``list[Source]``, known at start-up.
* **Out**: one ``StagedFile`` per source, put on ``out`` in completion order (not source
  order). Local sources go through at once with ``path`` = the local file itself (no
  copy). Remote ones are put only once the whole body is on disk at
  ``staging_dir/<name>``, fsynced, and its sha256/md5 verified when the source has one
  (the sha256 travels on the ``StagedFile``). Nothing unverified is ever put.
* **Bound**: at most ``concurrency`` transfers (``per_host`` per host); a finished download
  keeps its slot while it waits for room in ``out``, so at most ``concurrency`` staged
  files wait beyond the queue's own bound (bounded disk).
* **End of stream**: this stage calls ``await out.close()`` after the last source is put.
* **Failure**: the stage raises (a ``SourceError``); it does not close ``out``. The pipeline
  aborts the queues. Partial ``.part`` files stay, so a rerun resumes them.

Staging one source (``etl.download.fetch``): local files pass through (hashed only when
they have a checksum); objects stream in a thread (``etl.download.objects``); HTTP sources
are fetched by a ``Transfer``, with retries, resume of ``.part`` files and conditional
GETs, each under one of the ``concurrency`` slots and one of its host's ``per_host``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from etl.core.config import DownloadConfig
from etl.core.errors import ETLError
from etl.core.objstore import is_object_url
from etl.core.queues import Puttable, drain
from etl.core.records import Source, StagedFile
from etl.core.stats import ProgressSink
from etl.download.fetch import DownloadStats, FetchContext, SizeSink, Transfer, local_size, stage_local
from etl.download.http import client_session
from etl.download.objects import stage_object
from etl.download.source_state import SourceState

log = logging.getLogger("etl.download")

# Source tasks alive per download slot: more lets other hosts proceed while one host's slots
# are all busy; each waiting task costs a little memory.
ADMISSION_PER_SLOT = 4


# ------------------------------------------------------------------------ the stage


async def download_stage(
    sources: list[Source],
    cfg: DownloadConfig,
    staging_dir: Path,
    out: Puttable[StagedFile],
    *,
    state_file: Path | None = None,
    full_refresh: bool = False,
    progress: ProgressSink | None = None,
    sized: SizeSink | None = None,
) -> DownloadStats:
    """Stage every source and put it on ``out`` (see the module docstring for the contract).

    ``sized(source, nbytes)`` is told a source's size as soon as the stage knows it, before
    its body is on disk: a response's ``Content-Length`` (or the whole size in a ``206``'s
    ``Content-Range``), an object's size, a local file's size. It may be called again for a
    source (a retry, a restart) and from a thread (objects); a source whose size is unknown
    (chunked transfer) is not named before it is put. A 304 is not named either."""
    start = time.monotonic()
    stats = DownloadStats()
    await asyncio.to_thread(staging_dir.mkdir, parents=True, exist_ok=True)
    state = await asyncio.to_thread(SourceState.load, state_file)
    try:
        async with client_session(cfg) as session:
            run = FetchContext(session, cfg, staging_dir, state, full_refresh, stats, progress, sized)
            fetcher = _Fetcher(run, out)
            await _run_all(sources, fetcher.stage_one, cfg.concurrency * ADMISSION_PER_SLOT)
    finally:
        await state.save(keep={s.url for s in sources})  # keeps what finished, even on failure
        stats.seconds = round(time.monotonic() - start, 3)
        log.info(
            "%d of %d files staged: %d bytes received, %d not modified, %d bytes resumed, %d retries, %.1fs",
            stats.files,
            len(sources),
            stats.bytes,
            stats.not_modified,
            stats.resumed_bytes,
            stats.retries,
            stats.seconds,
            extra={"stage": "download", "source": ""},
        )
    await out.close()
    return stats


class _Listed:
    """The sources as ``flow.drain`` reads a queue: one at a time, ``None`` after the last."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self._it = iter(sources)

    async def get(self) -> Source | None:
        return next(self._it, None)


async def _run_all(sources: Iterable[Source], one: Callable[[Source], Awaitable[None]], window: int) -> None:
    """Run ``one`` for every source with at most ``window`` tasks alive; raise the first error."""
    try:
        await drain(_Listed(sources), window, one)
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        for other in errors[1:]:
            log.error("also failed: %s", other, extra={"stage": "download", "source": ""})
        first = next((e for e in errors if isinstance(e, ETLError)), errors[0])
        raise first from first.__cause__


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


class _Fetcher:
    """One stage run's slots and output: each source is staged under them, then put on ``out``."""

    def __init__(self, run: FetchContext, out: Puttable[StagedFile]) -> None:
        self.run = run
        self.out = out
        self.slots = asyncio.Semaphore(run.cfg.concurrency)
        self.host_slots: dict[str, asyncio.Semaphore] = {}

    def host_slot(self, url: str) -> asyncio.Semaphore:
        parts = urlsplit(url)
        host = f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"
        return self.host_slots.setdefault(host, asyncio.Semaphore(self.run.cfg.per_host))

    async def stage_one(self, src: Source) -> None:
        run = self.run
        if is_object_url(src.url):  # s3:// and other fsspec URLs: streamed in a thread
            async with self.slots:
                staged = await stage_object(
                    src, run.staging_dir, run.cfg.chunk_bytes, sized=lambda n: run.expect(src, n)
                )
                run.stats.bytes += staged.size
                run.report(nbytes=staged.size)
                await self.out.put(staged)
        elif not src.is_remote:
            if run.sized is not None and (src.sha256 or src.md5):  # hashing takes a while: size first
                run.expect(src, await asyncio.to_thread(local_size, src))
            await self.out.put(await stage_local(src))
        else:
            async with self.slots, self.host_slot(src.url):
                staged = await Transfer(run, src).run()
                await self.out.put(staged)
        run.stats.files += 1
        run.report(items=1)

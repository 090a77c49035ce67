"""Crash recovery for the transform stage: retry, split and set aside chunks whose worker died.

``etl.transform.stage``'s dispatcher hands every chunk to a ``ChunkRunner``; the executor runs
one attempt and reports a dead, killed or timed-out worker as ``WorkerCrashed`` (or
``ChunkTimeout``). The runner then decides what happens to the chunk (issues 4 and 5):

* a chunk whose worker got **SIGKILL** (what the OOM killer sends) is retried as two
  halves, recursively, while the halves keep at least ``MIN_SPLIT_ROWS`` rows; splitting
  costs no attempt. Halves keep the chunk's ``index`` and get their own ``row_start`` and
  ``rows``; their part files get a suffix naming the path of halves, ``-h`` + one bit per
  split (``part-00001-000003-h01.parquet`` = chunk 3, first half, its second half). The
  pieces of a chunk are leaves of one binary tree, so no name is a prefix of another and
  sorting the names still gives the serial row order. The pieces' results are merged into
  the chunk's one ``ChunkResult`` (dead-letter rows into its one ``rejected-…`` file).
* a ``ChunkTimeout`` that is not ``retryable`` (the thread executor's: the chunk's thread
  is still running it and cannot be stopped) fails the run at once, whatever ``on_error``.
* other crashes, timeouts and pieces too small to split are retried as they are, up to
  ``max_attempts`` attempts per piece; then ``on_error = "fail"`` fails the run with the
  piece's source file, row range and signal, while ``"quarantine"`` sets the piece aside
  (every row to the dead-letter output, reason "worker crashed: killed by SIGKILL after
  N attempts") and ``"skip"`` only counts its rows as rejected; the run goes on and
  exits 3 (rows out + rows rejected = rows in).

A ``Watchdog`` (issue 21) guards every attempt: when attempts are in flight, the executor
says no worker is on any chunk (``busy() == 0``) and no attempt has started or ended for
``transform.stall_timeout`` seconds, the chunks are lost somewhere between the dispatcher
and the workers: every such attempt is cancelled and fails as ``WorkerCrashed`` (signal
"stalled"), so the runner resubmits it, and past ``max_attempts`` the run fails naming
it. A worker that is busy for long is not a stall: that is ``chunk_timeout``'s business.

Dead-letter rows are encoded by ``etl.core.parts.encode_rejects`` (one ``rejected-…``
JSON Lines file per chunk), which workers use for rows a step rejects and the runner for
a whole chunk set aside.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pandas as pd

from etl.core.chunks import decode_chunk, split_chunk
from etl.core.config import ReadConfig, TransformConfig
from etl.core.errors import ChunkTimeout, WorkerCrashed
from etl.core.parts import encode_rejects, rejects_name, split_name
from etl.core.records import RESULT_COUNTERS, Chunk, ChunkResult, Part

if TYPE_CHECKING:
    from etl.transform.executors import RunsChunks, TransformStats

log = logging.getLogger("etl.transform")  # the stage's logger: records keep their name

MIN_SPLIT_ROWS = 1_000  # smallest half of an OOM-killed chunk: smaller means more retries and tiny parts
OOM_KILL = "killed by SIGKILL"  # how describe_exit() names the OOM killer's signal

# ------------------------------------------------------------ dead-letter output


# ---------------------------------------------------------------- crashed chunks


class ChunkRunner:
    """Runs one chunk to completion: retries, splits after SIGKILL, sets aside or fails."""

    def __init__(
        self,
        executor: RunsChunks,
        cfg: TransformConfig,
        stats: TransformStats,
        read: ReadConfig,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.executor = executor
        self.cfg = cfg
        self.read = read
        """How to parse a raw CSV chunk in the parent, to set its rows aside."""
        self.stats = stats
        self.watchdog = watchdog
        """Resubmits attempts that stall (see the module docstring); None: not watched."""

    async def run(self, chunk: Chunk) -> ChunkResult:
        """The chunk's result; a split chunk's pieces merged back into one."""
        pieces = await self._run_piece(chunk, "")
        return pieces[0] if len(pieces) == 1 else merge_pieces(chunk, pieces)

    async def _run_piece(self, chunk: Chunk, path: str) -> list[ChunkResult]:
        """Results for ``chunk``'s rows; ``path`` is its place among halves ("" = whole)."""
        max_attempts = self.cfg.max_attempts
        for attempt in range(1, max_attempts + 1):
            try:
                running = self.executor.run(chunk)
                result = await (running if self.watchdog is None else self.watchdog.watch(running, chunk))
            except WorkerCrashed as e:
                e.attempts = attempt
                if not e.retryable:  # the thread executor's timeout: the chunk is still running
                    raise
                if type(e) is WorkerCrashed and e.signal == OOM_KILL and chunk.rows >= 2 * MIN_SPLIT_ROWS:
                    halves = await asyncio.to_thread(split_chunk, chunk)
                    if halves is not None:
                        return await self._split(chunk, halves, path, e)
                if attempt == max_attempts:
                    return [self._give_up(chunk, e)]
                self.stats.retries += 1
                log.warning(
                    "%s: %s; retrying (attempt %d of %d)",
                    chunk.label,
                    e.message,
                    attempt + 1,
                    max_attempts,
                    extra={"stage": "transform", "source": chunk.source_name},
                )
                continue
            result.attempts = attempt
            return [rename_for_split(result, path)]
        raise AssertionError("unreachable")

    async def _split(self, chunk: Chunk, halves: tuple[Chunk, Chunk], path: str, e: WorkerCrashed) -> list[ChunkResult]:
        first, second = halves
        self.stats.splits += 1
        log.warning(
            "%s: %s (out of memory?); retrying as two halves of %d and %d rows",
            chunk.label,
            e.message,
            first.rows,
            second.rows,
            extra={"stage": "transform", "source": chunk.source_name},
        )
        # One half after the other: if memory was the problem, two at once might not fit either.
        return await self._run_piece(first, path + "0") + await self._run_piece(second, path + "1")

    def _give_up(self, chunk: Chunk, e: WorkerCrashed) -> ChunkResult:
        attempts = f"{e.attempts} attempt{'s' if e.attempts > 1 else ''}"
        if self.cfg.on_error == "fail":
            e.message += f" (attempt {e.attempts} of transform.max_attempts = {self.cfg.max_attempts})"
            raise e
        reason = (
            f"chunk timed out: ran longer than transform.chunk_timeout = {self.cfg.chunk_timeout}s after {attempts}"
            if isinstance(e, ChunkTimeout)
            else f"worker crashed: {e.signal} after {attempts}"
        )
        self.stats.pieces_set_aside += 1
        rows, rejects = whole_chunk_rejects(chunk, reason, self.read)
        log.warning(
            "%s: %s; %d rows set aside (transform.on_error = %r)",
            chunk.label,
            reason,
            rows,
            self.cfg.on_error,
            extra={"stage": "transform", "source": chunk.source_name},
        )
        result = ChunkResult(
            chunk.source_index, chunk.index, rows_in=rows, rows_out=0, rows_rejected=rows, attempts=e.attempts
        )
        if self.cfg.on_error == "quarantine":
            result.rejects = rejects
        return result


class Watchdog:
    """Resubmits attempts that made no progress while no worker was on them (see above)."""

    def __init__(self, timeout: float, busy: Callable[[], int]) -> None:
        self.timeout = timeout
        self.busy = busy
        """The executor's ``busy()``: chunks a worker is on now (blocking: run in a thread)."""
        self.stalls = 0
        """Times the watchdog acted."""
        self.longest_quiet = 0.0
        """Longest time (s) attempts were in flight and none started or ended: a stall's length."""
        self._event = time.monotonic()
        self._attempts: dict[asyncio.Future[ChunkResult], Chunk] = {}
        self._stalled: set[asyncio.Future[ChunkResult]] = set()
        self._last = time.monotonic()

    async def watch(self, attempt: Awaitable[ChunkResult], chunk: Chunk) -> ChunkResult:
        """Await one attempt; ``WorkerCrashed`` (signal "stalled") if the watchdog gave up on it."""
        future = asyncio.ensure_future(attempt)
        self._progress()
        self._attempts[future] = chunk
        try:
            return await future
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if future in self._stalled and not (me is not None and me.cancelling()):
                raise WorkerCrashed(
                    f"no progress for {self.timeout:g}s (transform.stall_timeout) while the chunk was in "
                    "flight and no worker was on it: the chunk was lost",
                    item=chunk.label,
                    signal="stalled",
                ) from None
            raise
        finally:
            self._progress()
            del self._attempts[future]
            self._stalled.discard(future)

    def _progress(self) -> None:
        now = time.monotonic()
        if self._attempts:
            self.longest_quiet = max(self.longest_quiet, now - self._event)
        self._event = self._last = now

    async def run(self) -> None:
        """Check once ``timeout`` seconds have passed without progress; until cancelled."""
        while True:
            left = self._last + self.timeout - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)
                continue
            if (
                self._attempts
                and await asyncio.to_thread(self.busy) == 0
                and time.monotonic() - self._last >= self.timeout
            ):
                self._act()
            self._last = time.monotonic()  # idle, busy or acted: the next look is a full period away

    def _act(self) -> None:
        self.stalls += 1
        stalled = [f for f in self._attempts if not f.done()]
        log.warning(
            "transform: %d chunk(s) in flight made no progress for %gs with no worker on them "
            "(transform.stall_timeout); resubmitting: %s",
            len(stalled),
            self.timeout,
            ", ".join(self._attempts[f].label for f in stalled),
            extra={"stage": "transform"},
        )
        for future in stalled:
            self._stalled.add(future)
            future.cancel()


def whole_chunk_rejects(chunk: Chunk, reason: str, read: ReadConfig) -> tuple[int, Part]:
    """Every row of a chunk that could not be transformed: how many, and as dead-letter lines."""
    df, malformed = decode_chunk(chunk, read, on_error="skip")  # the parent parses a CSV chunk: error path only
    raws = [json.dumps(r, ensure_ascii=False, default=str) for r in df.to_dict("records")]
    rejects = pd.DataFrame(
        {
            "_row": df.index,
            "_step": "transform",
            "_reason": reason,
            "_raw": raws,
        }
    )
    return len(df) + (0 if malformed is None else len(malformed)), encode_rejects(rejects, chunk)


def rename_for_split(result: ChunkResult, path: str) -> ChunkResult:
    """Give a half's parts the ``-h<path>`` suffix so halves never collide and sort in order."""
    if path:
        result.parts = [dataclasses.replace(p, relpath=split_name(p.relpath, path)) for p in result.parts]
    return result


def merge_pieces(chunk: Chunk, pieces: list[ChunkResult]) -> ChunkResult:
    """One result for a split chunk: every piece's parts, one dead-letter file, summed counts."""
    merged = ChunkResult(
        chunk.source_index, chunk.index, rows_in=0, rows_out=0, attempts=max(p.attempts for p in pieces)
    )
    for p in pieces:
        merged.parts += p.parts
        for name in RESULT_COUNTERS:
            setattr(merged, name, getattr(merged, name) + getattr(p, name))
        if p.checks is not None:  # row-check tallies and unique keys of every piece
            if merged.checks is None:
                merged.checks = p.checks
            else:
                merged.checks.merge(p.checks)
    rejects = [p.rejects for p in pieces if p.rejects is not None]
    if rejects:  # JSON Lines concatenate; pieces are in row order
        merged.rejects = Part(rejects_name(chunk), b"".join(r.data for r in rejects), sum(r.rows for r in rejects))
    return merged

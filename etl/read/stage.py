"""The read stage: staged files in, chunks out, on a pool of reader threads.

Queues and flow::

    files queue ──► drain (event loop) ──► reader thread: read_chunks(file) ──► chunks queue
    (BoundedQueue[StagedFile],            at most `read.threads` files      (BoundedQueue[Chunk],
     closed by the download stage)        at once                            closed here)

* **In**: ``StagedFile`` records (a finished, verified local file) from the files queue.
  ``admit(staged)`` decides per file whether it is read at all (the run's bookkeeping
  skips a source whose output is already committed).
* **Out**: ``Chunk`` records (raw CSV text cut at record ends, or Arrow IPC bytes; see
  ``etl.read.formats``), put from the reader thread with ``put_threadsafe``, which blocks
  that thread, never the loop, while the chunks queue is full.
* **Bound**: at most ``read.threads`` files are open at once; the chunks queue's items and
  bytes bound what is read ahead of the transform stage.
* **End of stream**: once the files queue is drained and every reader has finished, this
  stage closes the chunks queue. ``done(source, chunks)`` is called after a file's last
  chunk is on the queue, so the run knows how many results to wait for.

Reading releases the GIL (ISA-L gunzip, pyarrow's C++ readers, numpy byte counts), which
is why threads and not processes do it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from etl.core.config import ReadConfig
from etl.core.queues import BoundedQueue, drain, in_pool
from etl.core.records import Chunk, Source, StagedFile
from etl.core.stats import ProgressSink, StageMeter
from etl.read.formats import read_chunks


@dataclass
class ReadStats:
    files: int = 0
    """Files read (skipped ones not counted)."""
    bytes: int = 0
    """Their sizes on disk (compressed)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, size: int) -> None:
        with self._lock:
            self.files += 1
            self.bytes += size


async def read_stage(
    files: BoundedQueue[StagedFile],
    chunks: BoundedQueue[Chunk],
    cfg: ReadConfig,
    pool: ThreadPoolExecutor,
    *,
    meter: StageMeter,
    progress: ProgressSink,
    admit: Callable[[StagedFile], bool] = lambda staged: True,
    done: Callable[[Source, int], None] = lambda source, chunks: None,
    unread: Callable[[int], None] = lambda nbytes: None,
    set_aside: bool = False,
) -> ReadStats:
    """Read every staged file into chunks (see the module docstring); ``pool`` has
    ``cfg.threads`` threads and is owned by the caller (shut down off the loop).

    ``progress`` counts each chunk and the file bytes it consumed (``Chunk.source_bytes``);
    bytes of a file no chunk carried (a header-only file, trailing blank lines) are counted
    once the file is read, and passed to ``unread`` (the transform bar counts them too), so
    a read file always adds its whole size. ``set_aside``: see ``read_chunks``."""
    stats = ReadStats()

    def read_file(staged: StagedFile) -> None:
        if not admit(staged):
            return  # unchanged or already committed: its parts are in place
        meter.count_in(1, staged.size)
        count = carried = 0
        with meter.working():
            for chunk in read_chunks(staged, cfg, set_aside=set_aside):
                with meter.blocked():
                    chunks.put_threadsafe(chunk)
                count += 1
                carried += chunk.source_bytes
                rows = chunk.rows if chunk.kind == "arrow" else 0  # raw CSV: rows are known once parsed
                meter.count_out(1, chunk.nbytes, rows)
                progress.update(items=1, nbytes=chunk.source_bytes)
        if (rest := max(staged.size - carried, 0)) > 0:
            progress.update(nbytes=rest)
            unread(rest)
        done(staged.source, count)
        stats.add(staged.size)

    await drain(files, cfg.threads, in_pool(pool, read_file))
    await chunks.close()
    return stats

"""The write stage: workers' pieces in, right-sized output files out, on writer threads.

Queues and flow::

    results queue ──► drain (event loop) ──► writer thread: writer.write(piece) ──► spool
    (BoundedQueue[ChunkResult],             at most `output.writer_threads`    (temp folder)
     closed by the transform stage)         results at once                       │
                                            writer.chunk_done(...) ──► FileCutter ┘
                                            (etl.write.files: pieces in serial order
                                             into per-partition Parquet/CSV writers)
                                            ──► output files ──► publish()

* **In**: ``ChunkResult`` records from the results queue: each holds a chunk's rows per
  partition folder as Arrow IPC pieces (``Part``, see ``etl.core.parts``): a file a local
  worker wrote into ``writer.incoming()``, which ``writer.write`` renames into the spool,
  or the bytes (Dask); and at most one dead-letter file.
* **Out**: output files in the run's private temp folder (``etl.write.folder``) or run
  prefix (``etl.write.objects``), cut in serial row order by ``etl.write.files``:
  ``output.row_group_size`` rows per row group, a file closed once it reaches
  ``output.target_file_size``. ``written(result, files)`` is called once all of a
  result's pieces are in the spool (whole, not fsynced: see ``etl.core.parts.write_ipc_file``), with ``(relpath, rows, bytes)`` per piece, for
  the run's manifest (resume re-cuts the files from committed pieces).
* **Bound**: at most ``output.writer_threads`` results are taken at once; the thread that
  takes a result also encodes the row groups it completes, and helps with other
  partitions' queued row groups, before taking the next one, so a slow disk or encoder
  leaves results in the queue, whose bound pushes back on the transform stage. Chunks that arrive ahead of the serial order wait on disk, not in
  memory; open files buffer under a row group each, at most ``files.MAX_OPEN_FILES``.
* **End of stream**: when the results queue is closed and drained, the stage feeds what
  is left and closes every file (partitions in parallel on the writer threads); it closes
  nothing else. Publishing (``writer.publish()``) is the pipeline's call, once every
  stage has succeeded; after a failure it calls ``writer.discard()``.

``open_writer`` and ``clean_leftovers`` pick the folder or the object-store writer from
``output.path`` (a local path, or a URL).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etl.core.config import OutputConfig
from etl.core.parts import SPOOL_DIR
from etl.core.queues import BoundedQueue, drain, in_pool
from etl.core.records import ChunkResult
from etl.core.stats import ProgressSink, StageMeter
from etl.write.folder import OutputWriter

Written = list[tuple[str, int, int]]
"""(relpath, rows, bytes) of each file a result became."""


def open_writer(out: OutputConfig, run_id: str, adopt: Path | None = None) -> OutputWriter:
    """The writer for ``out.path``: a local folder, or an object-store prefix (a URL); a
    Delta table with ``output.format = "delta"`` (``etl.write.delta``)."""
    if out.table_format == "delta":
        from etl.write.delta import open_delta_writer  # deltalake only when a job needs it

        return open_delta_writer(out, run_id, adopt)
    if isinstance(out.path, str):  # URLs stay str in the config; local paths are Path
        from etl.write.objects import (
            ObjectOutputWriter,  # fsspec only when an output needs it
        )

        return ObjectOutputWriter(out, run_id, adopt)
    return OutputWriter(out, run_id, adopt)


def clean_leftovers(out: OutputConfig, keep: Path | None = None) -> list[Any]:
    """Repair what dead runs left at ``out.path`` (see each writer's ``clean_leftovers``).
    Call it only under the job's lock: a live run's leftovers look like a dead one's."""
    if out.table_format == "delta":
        from etl.write.delta import clean_delta_leftovers

        return clean_delta_leftovers(out, keep)
    if isinstance(out.path, str):
        from etl.write.objects import ObjectOutputWriter

        return ObjectOutputWriter.clean_leftovers(out, keep)
    return OutputWriter.clean_leftovers(out, keep)


@dataclass
class WriteStats:
    parts: int = 0
    """Output files written (dead-letter files not counted)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, parts: int) -> None:
        with self._lock:
            self.parts += parts


async def write_stage(
    results: BoundedQueue[ChunkResult],
    writer: OutputWriter,
    threads: int,
    pool: ThreadPoolExecutor,
    *,
    meter: StageMeter,
    progress: ProgressSink,
    written: Callable[[ChunkResult, Written], None] = lambda result, files: None,
) -> WriteStats:
    """Write every result's files (see the module docstring); ``pool`` has ``threads``
    threads and is owned by the caller (shut down off the loop)."""
    stats = WriteStats()

    def write(result: ChunkResult) -> None:
        meter.count_in(1, result.output_bytes)
        files: Written = []
        with meter.working():
            for part in result.parts:
                files.append((relpath := writer.write(part), part.rows, part.nbytes))
                progress.update(items=1, nbytes=part.nbytes)
                # items out are files: a piece's file is counted when the cutter closes it
                meter.count_out(0 if relpath.startswith(f"{SPOOL_DIR}/") else 1, part.nbytes, part.rows)
            if (rej := result.rejects) is not None:
                files.append((writer.write_rejects(rej), rej.rows, len(rej.data)))
        written(result, files)
        pieces = [f for f, _, _ in files if f.startswith(f"{SPOOL_DIR}/")]
        stats.add(len(result.parts) - len(pieces))  # parts stored as they are (not pieces)
        with meter.working():
            writer.chunk_done(result.source_index, result.index, pieces)

    await drain(results, threads, in_pool(pool, write))
    loop = asyncio.get_running_loop()
    folders = await loop.run_in_executor(pool, writer.finish_files)

    def close(folder: str) -> None:
        with meter.working():
            writer.close_files(folder)

    await asyncio.gather(*(loop.run_in_executor(pool, close, f) for f in folders))
    stats.add(len(writer.files()))
    meter.count_out(len(writer.files()), 0, 0)
    return stats

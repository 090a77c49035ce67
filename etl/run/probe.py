"""Measure what a chunk costs before the run, for the planner in ``etl.run.resources``.

The parent reads the first chunk of the first local source (``PROBE_ROWS`` rows) and one
throw-away worker, started the same way as the pool's, transforms it; the worker reports
its RSS after start-up and its peak RSS over the chunk. The probe runs in a child, not in
the parent, because allocators keep what they grew to: transforming in the parent would
leave it holding the probe's peak for the whole run. A job whose sources are all on HTTP
is measured on the copy of its first source an earlier run staged, else on the first
``REMOTE_SAMPLE_BYTES`` of it (CSV or JSON Lines, plain, gzip or bz2), cut after its last
whole record; when that cannot be had it uses
the ``FALLBACK_*`` costs, which are ~2.5x the benchmark job's and so give small chunks.
The result is a ``Probe``, whose per-row figures the planner scales to any chunk size.
"""

from __future__ import annotations

import bz2
import concurrent.futures
import logging
import multiprocessing
import resource
import tempfile
import urllib.request
import zlib
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from etl.core.config import JobConfig
from etl.core.errors import ETLError
from etl.core.records import Chunk, Source, StagedFile

log = logging.getLogger("etl.resources")  # the planner's logger: records keep their name

PROBE_ROWS = 50_000  # rows measured before the run: bigger is a truer per-row cost, but a slower start
PROBE_READ_ROWS = 200_000  # rows read to measure a reader: its buffers keep growing over the first few blocks
READER_SLACK = 1.5  # a reader's RSS creeps up past the probe over a long file (measured: ~130 -> ~200 MiB by 4M rows)
WARM_ROWS = 1_000  # rows run first in the probe worker so lookup tables and imports are in its baseline
REMOTE_SAMPLE_BYTES = 4 << 20  # fetched from a remote-only job to measure a chunk (~50k rows of gzip CSV):
# more is a truer per-row cost, but a slower start
FALLBACK_CHUNK_BYTES_PER_ROW = 320  # remote-only jobs: ~2.5x the taxi data's 130 B/row, for wider rows
FALLBACK_WORK_BYTES_PER_ROW = 2560  # ~2.5x the taxi job's ~1 KiB/row; too high only costs smaller chunks
FALLBACK_RESULT_BYTES_PER_ROW = 128  # ~4x the taxi job's zstd Parquet
FALLBACK_READER_BYTES = 200 << 20  # a reader thread's decompression and parse buffers, after a long file



@dataclass
class Probe:
    """What one measured chunk costs; per-row figures scale it to any chunk size."""

    rows: int
    chunk_bytes: int
    """Arrow IPC bytes of the chunk: what queues and pipes hold."""
    reader_bytes: int
    """One reader thread's cost: parent RSS growth over the first ``PROBE_READ_ROWS`` rows."""
    parent_base: int
    worker_base: int
    """A worker's RSS after start-up and a warm-up chunk (imports, lookup tables)."""
    worker_work: int
    """A worker's peak RSS over the chunk, above its base."""
    frame_bytes: int = 0
    """``DataFrame.memory_usage(deep=True)`` of the decoded chunk (for the report)."""
    result_bytes: int = 0
    servers: int = 0
    """RSS of helper processes (fork server, resource tracker)."""
    measured: str = "fallback"
    """Where the figures come from: a source name, or ``fallback``."""

    def per_row(self, name: str) -> float:
        return getattr(self, name) / max(self.rows, 1)


def measure(cfg: JobConfig, sources: list[Source]) -> Probe:
    """Measure the first local source's first chunk; fall back to estimates without one."""
    parent_base = psutil.Process().memory_info().rss
    local = next((s for s in sources if not s.is_remote), None)
    with tempfile.TemporaryDirectory(prefix="etl-probe-") as folder:
        if local is None and sources:
            local = _staged_copy(cfg, sources[0]) or _remote_sample(cfg, sources[0], Path(folder))
        chunk, reader_bytes = None, FALLBACK_READER_BYTES
        if local is not None:
            try:
                chunk, reader_bytes = _read_probe(cfg, local)
            except (ETLError, OSError) as e:  # the run itself reports bad input, with context
                log.info("could not measure %s (%s); using estimates", local.name, e, extra={"stage": "plan"})
    result = _worker_probe(cfg, chunk)
    if chunk is None or "work" not in result:
        rows = PROBE_ROWS
        return Probe(rows, FALLBACK_CHUNK_BYTES_PER_ROW * rows, reader_bytes, parent_base, result["base"],
                     FALLBACK_WORK_BYTES_PER_ROW * rows, result_bytes=FALLBACK_RESULT_BYTES_PER_ROW * rows,
                     servers=_helper_rss())  # fmt: skip
    return Probe(chunk.rows, chunk.nbytes, reader_bytes, parent_base, result["base"], result["work"],
                 result["frame"], result["result"], _helper_rss(), chunk.source_name)  # fmt: skip


def _staged_copy(cfg: JobConfig, src: Source) -> Source | None:
    """The copy an earlier run staged (a cron rerun): measured without a request."""
    path = cfg.staging_dir / src.name
    return Source(src.index, str(path), src.name, src.format) if path.is_file() else None


def _remote_sample(cfg: JobConfig, src: Source, folder: Path) -> Source | None:
    """The first ``REMOTE_SAMPLE_BYTES`` of a remote CSV/JSONL source, decompressed and cut
    after its last whole record, as a local source to measure; None when it cannot be had."""
    from etl.read.csv_cut import record_end
    from etl.read.formats import COMPRESSION_BY_SUFFIX

    name = Path(src.name)
    codec = COMPRESSION_BY_SUFFIX.get(name.suffix.lower())
    if src.format not in ("csv", "jsonl") or codec not in (None, "gzip", "bz2") or not src.is_remote:
        return None
    headers = {**cfg.download.headers, **dict(src.headers), "Accept-Encoding": "identity",
               "Range": f"bytes=0-{REMOTE_SAMPLE_BYTES - 1}"}  # fmt: skip
    timeout = cfg.download.timeout.connect + cfg.download.timeout.read
    try:
        with urllib.request.urlopen(urllib.request.Request(src.url, headers=headers), timeout=timeout) as resp:
            raw = resp.read(REMOTE_SAMPLE_BYTES)  # a server that ignores Range: the rest is never read
        text = (zlib.decompressobj(wbits=47).decompress(raw) if codec == "gzip"  # 47: gzip or zlib header
                else bz2.BZ2Decompressor().decompress(raw) if codec == "bz2" else raw)  # fmt: skip
    except (OSError, ValueError, zlib.error) as e:  # urllib's errors are OSErrors
        log.info("could not sample %s (%s); using estimates", src.name, e, extra={"stage": "plan"})
        return None
    end = record_end(text, len(text)) if src.format == "csv" else text.rfind(b"\n") + 1
    path = folder / (name.stem if codec else name.name)
    path.write_bytes(text[:end])
    return Source(src.index, str(path), f"{path.name} (first {len(raw) >> 10} KiB)", src.format)


def _read_probe(cfg: JobConfig, src: Source) -> tuple[Chunk | None, int]:
    from etl.read.formats import read_chunks

    path = Path(src.url)
    proc = psutil.Process()
    before = proc.memory_info().rss
    read = cfg.read.model_copy(update={"chunk_rows": min(cfg.read.chunk_rows, PROBE_ROWS)})
    chunks = read_chunks(StagedFile(src, path, path.stat().st_size), read)
    first, rows, peak = None, 0, before
    try:
        for chunk in chunks:  # the first chunk is the probe; the next ones grow the reader to size
            first = first or chunk
            rows += chunk.rows
            peak = max(peak, proc.memory_info().rss)
            if rows >= PROBE_READ_ROWS:
                break
    finally:
        chunks.close()
    return first, int((peak - before) * READER_SLACK)


def _worker_probe(cfg: JobConfig, chunk: Chunk | None) -> dict[str, int]:
    """Run the chunk in one worker started like the pool's; report its RSS figures."""
    from etl.transform.stage import WorkerSpec, init_worker, mp_context

    threads = cfg.transform.executor in ("thread", "serial")
    if threads and chunk is None:
        return {"base": 0}  # threads share the parent, whose RSS is counted already
    # A thread executor has no fork server to reuse: spawn one short-lived process instead of
    # measuring in the parent, whose allocator caches (the read probe's) would hide the cost.
    ctx = multiprocessing.get_context("spawn") if threads else mp_context()
    spec = WorkerSpec(cfg.transform, cfg.output, cfg.read)
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=init_worker, initargs=(spec, True))
    try:
        warm = _head(chunk, WARM_ROWS) if chunk is not None else None
        found = {"base": pool.submit(_probe_base, warm).result()}
        if chunk is not None:
            found.update(pool.submit(_probe_chunk, chunk, found["base"]).result())
    except (ETLError, BrokenProcessPool, OSError) as e:  # the run itself reports these, with context
        log.info("could not measure a chunk in a worker (%s); using estimates", e, extra={"stage": "plan"})
        found = {"base": _worker_base_fallback()}
    finally:
        pool.shutdown(wait=True)
    if threads:
        found["base"] = 0  # threads share the parent, whose RSS is counted already
    return found


def _head(chunk: Chunk, rows: int) -> Chunk:
    from etl.read.csv_cut import head
    from etl.read.formats import decode_ipc, encode_ipc

    if chunk.kind == "csv":
        return head(chunk, rows)
    table = decode_ipc(chunk.data).slice(0, rows)
    return replace(chunk, rows=table.num_rows, data=encode_ipc(table))


def _probe_base(warm: Chunk | None) -> int:
    from etl.transform.stage import run_chunk

    if warm is not None:
        run_chunk(warm)
    return psutil.Process().memory_info().rss


def _probe_chunk(chunk: Chunk, base: int) -> dict[str, int]:
    """In the probe worker: peak RSS over one chunk (receiving it included), above ``base``."""
    from etl.transform import stage as transform

    result = transform.run_chunk(chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert transform._SPEC is not None
    frame = transform.decode_chunk(chunk, transform._SPEC.read, "skip")[0].memory_usage(deep=True).sum()
    return {"work": max(peak - base, 0), "frame": int(frame), "result": result.nbytes}


def _worker_base_fallback() -> int:
    return psutil.Process().memory_info().rss  # a worker imports about what the parent has


def _helper_rss() -> int:
    """RSS of the children left once the probe worker is gone: fork server, resource tracker."""
    return sum(_rss(p) for p in psutil.Process().children(recursive=True))


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:  # exited between listing and reading
        return 0

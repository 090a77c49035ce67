"""Measure one chunk in a throw-away worker, for the planner (``etl.run.resources``).

The worker is started the way the pool's are (a process from the fork server, or for the
thread executor a short-lived spawned process: measuring in the parent would hide the cost
behind its allocator's caches). It transforms a small warm-up chunk first, so imports and
lookup tables are in its baseline, then the chunk, and reports its RSS after start-up
(``base``), its peak RSS over the chunk above that (``work``), the decoded DataFrame's
size (``frame``) and the encoded result's (``result``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import resource
from concurrent.futures.process import BrokenProcessPool

import psutil

from etl.core.chunks import decode_chunk, head
from etl.core.errors import ETLError
from etl.core.records import Chunk
from etl.transform.executors import mp_context
from etl.transform.worker import WorkerSpec, current_spec, init_worker, run_chunk

log = logging.getLogger("etl.resources")  # the planner's logger: records keep their name

WARM_ROWS = 1_000  # rows run first so lookup tables and imports are in the worker's baseline


def measure_in_worker(spec: WorkerSpec, chunk: Chunk | None) -> dict[str, int]:
    """Run ``chunk`` in one worker started like the pool's; its RSS figures (see above).
    Only ``base`` when there is no chunk, or the worker could not run it."""
    threads = spec.transform.executor in ("thread", "serial")
    if threads and chunk is None:
        return {"base": 0}  # threads share the parent, whose RSS is counted already
    ctx = multiprocessing.get_context("spawn") if threads else mp_context()
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=init_worker, initargs=(spec, True))
    try:
        warm = head(chunk, WARM_ROWS) if chunk is not None else None
        found = {"base": pool.submit(_base, warm).result()}
        if chunk is not None:
            found.update(pool.submit(_work, chunk, found["base"]).result())
    except (ETLError, BrokenProcessPool, OSError) as e:  # the run itself reports these, with context
        log.info("could not measure a chunk in a worker (%s); using estimates", e, extra={"stage": "plan"})
        found = {"base": psutil.Process().memory_info().rss}  # a worker imports about what the parent has
    finally:
        pool.shutdown(wait=True)
    if threads:
        found["base"] = 0  # threads share the parent, whose RSS is counted already
    return found


def _base(warm: Chunk | None) -> int:
    if warm is not None:
        run_chunk(warm)
    return psutil.Process().memory_info().rss


def _work(chunk: Chunk, base: int) -> dict[str, int]:
    """In the worker: peak RSS over one chunk (receiving it included), above ``base``."""
    result = run_chunk(chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    frame = decode_chunk(chunk, current_spec().read, "skip")[0].memory_usage(deep=True).sum()
    return {"work": max(peak - base, 0), "frame": int(frame), "result": result.nbytes}

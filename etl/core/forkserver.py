"""The fork server the transform stage's process workers come from, and starting it early.

Workers are forked from a clean server process (``multiprocessing``'s forkserver), never
from the threaded parent. The server imports the worker module (pandas, pyarrow, the
steps) once, so each worker starts with them loaded. That import takes about half a second
of one core; ``start_early`` lets it run on another core while the parent is still
importing and validating the job, instead of after it, when the planner's probe needs
its first worker. This module imports only ``multiprocessing``: the command line calls it
before anything heavy is loaded.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver

WORKER_MODULE = "etl.transform.worker"  # what the server preloads for every worker (named, not imported)


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server preloading ``WORKER_MODULE``."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([WORKER_MODULE])
    return ctx


def start_early() -> None:
    """Start the server now (its preload runs beside the caller); the pool and the probe
    then use it as they would have started it. Call it only for the ``process`` executor:
    the server costs the memory of a worker's imports."""
    context()
    multiprocessing.forkserver.ensure_running()

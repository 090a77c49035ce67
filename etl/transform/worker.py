"""What runs inside a transform worker: decode a chunk, run the steps, encode the parts.

Only plain, picklable data crosses the process boundary: the ``WorkerSpec`` (the validated
transform, output and read config) once per worker, through the pool's initializer
(``init_worker``); then a ``Chunk`` in and a ``ChunkResult`` (encoded parts, rejected
rows, timings) out of ``run_chunk``. The serial and thread executors call the same
functions in the parent, so every executor runs one code path.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

import pandas as pd

from etl.core.chunks import decode_chunk
from etl.core.config import OutputConfig, ReadConfig, TransformConfig
from etl.core.errors import StepError
from etl.core.parts import encode_parts, encode_rejects
from etl.core.records import Chunk, ChunkResult, Part
from etl.transform.steps import apply_steps


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the chunk; sent once per worker process."""

    transform: TransformConfig
    output: OutputConfig
    read: ReadConfig
    """How to parse raw CSV chunks (``read.parse = "worker"``)."""


_SPEC: WorkerSpec | None = None
"""This process's spec, set by ``init_worker``."""


def init_worker(spec: WorkerSpec, ignore_sigint: bool = False) -> None:
    """Pool initializer: keep the spec for every chunk and make ``python`` steps importable."""
    global _SPEC
    _SPEC = spec
    base = str(spec.transform.base_dir)
    if base not in sys.path:
        sys.path.insert(0, base)
    if ignore_sigint:
        # Ctrl-C reaches the whole process group; the parent decides how the run stops.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_chunk(chunk: Chunk) -> ChunkResult:
    """Decode, transform and encode one chunk. Runs in a worker (or inline for serial)."""
    assert _SPEC is not None, "init_worker() was not called in this process"
    spec = _SPEC
    start = time.perf_counter()
    df, malformed = decode_chunk(chunk, spec.read, spec.transform.on_error)
    decoded = time.perf_counter()
    try:
        result, rejects = apply_steps(
            df,
            spec.transform.steps,
            base_dir=spec.transform.base_dir,
            on_error=spec.transform.on_error,
            label=chunk.label,
            unit=chunk.unit,
        )
    except StepError:
        raise
    except Exception as e:
        raise StepError(f"{type(e).__name__}: {e}", item=chunk.label) from e
    stepped = time.perf_counter()
    parts = encode_parts(
        result, spec.output, source_index=chunk.source_index, chunk_index=chunk.index, label=chunk.label
    )
    if malformed is not None:
        rejects = malformed if rejects is None else pd.concat([malformed, rejects], ignore_index=True)
    reject_part: Part | None = None
    n_rejected = 0 if rejects is None else len(rejects)
    if n_rejected and spec.transform.on_error == "quarantine":
        reject_part = encode_rejects(rejects, chunk)
    end = time.perf_counter()
    n_malformed = 0 if malformed is None else len(malformed)
    return ChunkResult(
        source_index=chunk.source_index,
        index=chunk.index,
        rows_in=len(df) + n_malformed,
        rows_out=len(result),
        rows_rejected=n_rejected,
        parts=parts,
        rejects=reject_part,
        seconds=end - start,
        decode_seconds=decoded - start,
        steps_seconds=stepped - decoded,
        encode_seconds=end - stepped,
    )


def current_spec() -> WorkerSpec:
    """The spec ``init_worker`` gave this process."""
    assert _SPEC is not None, "init_worker() was not called in this process"
    return _SPEC

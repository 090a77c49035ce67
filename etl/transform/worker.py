"""What runs inside a transform worker: decode a chunk, run the steps, hand the rows over.

Only plain, picklable data crosses the process boundary: the ``WorkerSpec`` (the validated
transform, output and read config) once per worker, through the pool's initializer
(``init_worker``); then a ``Chunk`` in and a ``ChunkResult`` (the rows per partition
folder as Arrow IPC pieces, which the write stage cuts into right-sized Parquet or CSV
files, ``etl.write.files``; rejected rows; timings) out of ``run_chunk``. With
``WorkerSpec.spool`` the pieces are files the worker wrote there, and the result carries
only their names and row counts. The serial and thread executors call the same
functions in the parent, so every executor runs one code path.

``serve`` is a process worker's whole life (``etl.transform.executors.ProcessExecutor``):
one pipe of its own to the parent, ``READY`` once the spec is installed, then one chunk in
and one reply out at a time, until the parent closes the pipe. A chunk is two messages
(``send_chunk``): its fields pickled, then its text as raw bytes; a reply is one pickle.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pandas as pd

from etl.core.chunks import decode_chunk
from etl.core.config import ChecksConfig, OutputConfig, ReadConfig, TransformConfig
from etl.core.errors import ETLError, StepError
from etl.core.parts import encode_parts, encode_rejects
from etl.core.records import Chunk, ChunkChecks, ChunkResult, Part
from etl.transform.checks import check_chunk
from etl.transform.steps import apply_steps, typed_columns


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the chunk; sent once per worker process."""

    transform: TransformConfig
    output: OutputConfig
    read: ReadConfig
    """How to parse raw CSV chunks (``read.parse = "worker"``)."""
    checks: ChecksConfig | None = None
    """Row checks run on every chunk's output (``[checks]``; ``etl.transform.checks``)."""
    spool: str | None = None
    """The writer's ``incoming`` folder when workers share this machine's disk: pieces are
    written there as files (``etl.core.parts.encode_parts``); None sends their bytes."""


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
    types = typed_columns(spec.transform.steps) if chunk.kind == "csv" else {}
    df, malformed = decode_chunk(chunk, spec.read, spec.transform.on_error, types)
    decoded = time.perf_counter()
    if chunk.set_aside and not len(df.columns):  # every record of a JSON Lines file set aside: no columns to step
        result, rejects = df, None
    else:
        result, rejects = _run_steps(df, chunk, spec)
    if rejects is not None and types:
        # A reject's _raw holds the row's input values as text: parse the chunk as text and
        # run it again, so dead letters are the same as without typed parsing (rare: bad rows).
        df, malformed = decode_chunk(chunk, spec.read, spec.transform.on_error)
        result, rejects = _run_steps(df, chunk, spec)
    checks: ChunkChecks | None = None
    if spec.checks is not None and spec.checks.row_checks:
        checks = check_chunk(result, spec.checks, chunk.source_name, chunk.unit, chunk.label)
    stepped = time.perf_counter()
    parts = encode_parts(
        result,
        spec.output,
        source_index=chunk.source_index,
        chunk_index=chunk.index,
        label=chunk.label,
        spool=None if spec.spool is None else Path(spec.spool),
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
        checks=checks,
    )


def _run_steps(df: pd.DataFrame, chunk: Chunk, spec: WorkerSpec) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    try:
        return apply_steps(
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


def current_spec() -> WorkerSpec:
    """The spec ``init_worker`` gave this process."""
    assert _SPEC is not None, "init_worker() was not called in this process"
    return _SPEC


READY = "ready"
"""A worker's first message on its pipe: the spec is installed, chunks may come."""

Reply = tuple[bool, Any, str]
"""What a worker sends back per chunk: (ok, ``ChunkResult`` or the exception, traceback text)."""


def recv_message(conn: Connection) -> Any:
    """``conn.recv()``, read straight into one buffer of the message's size.

    ``Connection.recv`` reads a large message in socket-buffer-sized pieces, each one a
    fresh allocation of the bytes still to come, and copies them into a BytesIO before
    unpickling: for the results of a default wide run (6 MiB each) that cost the parent
    0.10-0.12 CPU-s per 132 MiB, against 0.03 here (issue 15). The parent's slots read
    results with it. Same wire format as
    ``Connection.send`` (a 4-byte size, or -1 then an 8-byte size); EOFError at end of file,
    OSError when the pipe fails or is closed, as ``Connection.recv``."""
    return pickle.loads(_recv_raw(conn))


def send_chunk(conn: Connection, chunk: Chunk) -> None:
    """Send ``chunk`` to a worker: its fields pickled, then its data as a raw message.
    Pickled whole, a chunk's ~5-10 MB of CSV was copied once more into the pickle in the
    parent and once more out of it in the worker (4M taxi rows: 0.3 of the parent's CPU-s)."""
    conn.send(dataclasses.replace(chunk, data=b""))
    conn.send_bytes(chunk.data)


def recv_chunk(conn: Connection) -> Chunk:
    """The chunk ``send_chunk`` sent (its data a bytearray, read into place)."""
    head: Chunk = conn.recv()
    return dataclasses.replace(head, data=_recv_raw(conn))


def _recv_raw(conn: Connection) -> bytearray:
    """One message's bytes, as ``Connection.recv_bytes`` would give them, read into one buffer."""
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read_exact(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("end of file in the middle of a message")
        got += n
    del view  # a live export would keep the buffer from being released
    return buf


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = os.read(fd, n - len(data))
        if not piece:
            raise EOFError
        data += piece
    return data


def serve(conn: Connection, spec: WorkerSpec) -> None:
    """A process worker: install ``spec``, say ``READY``, then run every chunk that arrives on
    ``conn`` and send its ``Reply``. Returns when the parent closes the pipe (or dies)."""
    init_worker(spec, True)
    conn.send(READY)
    while True:
        try:
            chunk = recv_chunk(conn)
        except EOFError:  # the parent closed our pipe: the pool is stopping
            return
        reply: Reply
        try:
            reply = (True, run_chunk(chunk), "")
        except Exception as e:  # every failure of a chunk goes back to the parent, which raises it
            reply = (False, e, traceback.format_exc())
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # an unpicklable error or result
            text = reply[2] or traceback.format_exc()
            conn.send((False, ETLError(f"the worker could not send its reply: {e}", stage="transform"), text))

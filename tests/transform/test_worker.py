"""etl.transform.worker: init_worker + run_chunk in this process, on real chunks of real files."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from etl.core.config import JobConfig, load_job
from etl.core.errors import StepError
from etl.core.parts import ipc_to_table
from etl.core.records import Chunk, ChunkResult, Part, Source, StagedFile
from etl.read.formats import read_chunks
from etl.transform.worker import WorkerSpec, current_spec, init_worker, recv_message, run_chunk
from tests.conftest import write_trips_csv

ROOT = Path(__file__).resolve().parents[2]

HOOKS = '''
"""Python steps for tests/transform/test_worker.py."""


def tag(df, value):
    df["tag"] = value
    return df


def explode(df, message):
    raise ValueError(message)


def not_a_frame(df):
    return [1, 2, 3]
'''

HOOK_MODULE = "worker_contract_hooks"  # unique: python steps are imported once per process


def make_job(
    folder: Path,
    steps: str,
    *,
    executor: str = "thread",
    on_error: str = "fail",
    read: str = "chunk_rows = 60",
    output: str = "",
) -> JobConfig:
    (folder / f"{HOOK_MODULE}.py").write_text(HOOKS)
    job = folder / "job.toml"
    job.write_text(f"""
[job]
name = "worker-test"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[read]
{read}

[transform]
executor = "{executor}"
workers = 1
on_error = "{on_error}"
steps = [
{steps}
]

[output]
path = "out"
{output}
""")
    return load_job(job)


def spec_of(cfg: JobConfig) -> WorkerSpec:
    return WorkerSpec(cfg.transform, cfg.output, cfg.read)


def chunks_of(path: Path, cfg: JobConfig) -> list[Chunk]:
    source = Source(0, str(path), path.name, "csv")
    return list(read_chunks(StagedFile(source, path, path.stat().st_size), cfg.read))


def records_in(chunk: Chunk) -> int:
    """Whole CSV records in a raw-text chunk (quoted newlines do not end one)."""
    return sum(1 for row in csv.reader(io.StringIO(chunk.data.decode(), newline="")) if row)


def decode_part(part: Part) -> pa.Table:
    """A worker's piece: the chunk's rows of one partition as Arrow IPC (the writer cuts the
    output files from them, ``etl.write.files``)."""
    return ipc_to_table(part.data)


@pytest.fixture
def trips(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "trips.csv"
    write_trips_csv(path, rows=300, seed=5)
    return path


STEPS = f"""
  {{op = "cast", columns = {{trip_id = "int64", distance = "float64"}}}},
  {{op = "filter", expr = "distance > 10"}},
  {{op = "python", function = "{HOOK_MODULE}:tag", params = {{value = "t"}}}},
"""


def test_run_chunk_of_a_csv_chunk(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, STEPS)
    init_worker(spec_of(cfg))
    chunks = chunks_of(trips, cfg)
    assert len(chunks) > 2 and all(c.kind == "csv" for c in chunks)
    total_in = total_out = 0
    for chunk in chunks:
        result = run_chunk(chunk)
        assert isinstance(result, ChunkResult)
        assert (result.source_index, result.index) == (chunk.source_index, chunk.index)
        assert result.rows_in == records_in(chunk)
        assert 0 < result.rows_out < result.rows_in  # the filter kept some, not all
        assert result.rows_rejected == 0 and result.rejects is None
        tables = [decode_part(p) for p in result.parts]
        assert sum(t.num_rows for t in tables) == result.rows_out
        assert [p.rows for p in result.parts] == [t.num_rows for t in tables]
        for t in tables:
            assert set(t.column("tag").to_pylist()) == {"t"}
            assert min(t.column("distance").to_pylist()) > 10
            assert t.schema.field("trip_id").type == pa.int64()
        assert result.seconds >= 0 and result.decode_seconds >= 0
        total_in += result.rows_in
        total_out += result.rows_out
    with trips.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert total_in == len(rows)
    assert total_out == sum(1 for r in rows if float(r["distance"]) > 10)


def test_run_chunk_names_parts_by_source_and_chunk(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, STEPS)
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[1]
    (part,) = run_chunk(chunk).parts
    assert part.relpath == "part-00000-000001.arrow"


def test_run_chunk_of_an_arrow_chunk(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, STEPS, read='chunk_rows = 70\nparse = "reader"')
    init_worker(spec_of(cfg))
    chunks = chunks_of(trips, cfg)
    assert [c.rows for c in chunks] == [70, 70, 70, 70, 20]
    for chunk in chunks:
        result = run_chunk(chunk)
        assert result.rows_in == chunk.rows
        assert sum(decode_part(p).num_rows for p in result.parts) == result.rows_out


def test_run_chunk_csv_output(tmp_path: Path, trips: Path) -> None:
    """CSV output too gets Arrow pieces, typed: the writer formats the CSV files."""
    cfg = make_job(tmp_path, STEPS, output='format = "csv"')
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[0]
    result = run_chunk(chunk)
    assert all(p.relpath.endswith(".arrow") for p in result.parts)
    tables = [decode_part(p) for p in result.parts]
    assert sum(t.num_rows for t in tables) == result.rows_out
    assert all(t.schema.field("trip_id").type == pa.int64() for t in tables)


def test_run_chunk_without_steps_keeps_every_row_as_strings(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, "")
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[0]
    result = run_chunk(chunk)
    assert result.rows_out == result.rows_in == records_in(chunk)
    (table,) = [decode_part(p) for p in result.parts]
    assert table.column_names == list(chunk.columns)
    assert all(t == pa.string() for t in table.schema.types)


def test_quarantined_rows_are_counted_and_encoded(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, '{op = "cast", columns = {note = "float64"}},', on_error="quarantine")
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[0]
    result = run_chunk(chunk)
    assert result.rows_rejected > 0
    assert result.rows_out + result.rows_rejected == result.rows_in == records_in(chunk)
    assert sum(decode_part(p).num_rows for p in result.parts) == result.rows_out
    assert result.rejects is not None and result.rejects.rows == result.rows_rejected
    lines = [json.loads(line) for line in result.rejects.data.decode().splitlines()]
    assert len(lines) == result.rows_rejected
    assert all(r["source"] == "trips.csv" for r in lines)


def test_skipped_rows_are_counted_without_a_rejects_file(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, '{op = "cast", columns = {note = "float64"}},', on_error="skip")
    init_worker(spec_of(cfg))
    result = run_chunk(chunks_of(trips, cfg)[0])
    assert result.rows_rejected > 0 and result.rejects is None
    assert result.rows_out + result.rows_rejected == result.rows_in


# --------------------------------------------------------------------------- failures


def test_failing_python_step_is_a_step_error_naming_the_chunk(tmp_path: Path, trips: Path) -> None:
    steps = f'{{op = "python", function = "{HOOK_MODULE}:explode", params = {{message = "exploded on purpose"}}}},'
    cfg = make_job(tmp_path, steps)
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[2]
    with pytest.raises(StepError) as info:
        run_chunk(chunk)
    err = info.value
    assert err.item == chunk.label
    assert chunk.label in str(err)
    assert "exploded on purpose" in str(err) and "ValueError" in str(err)
    assert "transform.steps[0]" in str(err)


def test_python_step_returning_no_frame_is_a_step_error(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, f'{{op = "python", function = "{HOOK_MODULE}:not_a_frame"}},')
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[0]
    with pytest.raises(StepError, match="expected a pandas DataFrame") as info:
        run_chunk(chunk)
    assert info.value.item == chunk.label


def test_bad_value_under_on_error_fail_names_the_chunk_and_line(tmp_path: Path, trips: Path) -> None:
    cfg = make_job(tmp_path, '{op = "cast", columns = {note = "float64"}},')
    init_worker(spec_of(cfg))
    chunk = chunks_of(trips, cfg)[0]
    with pytest.raises(StepError) as info:
        run_chunk(chunk)
    assert info.value.item == chunk.label and "line" in str(info.value)


# ------------------------------------------------------------------------ the spec


def test_init_worker_keeps_the_spec_and_makes_base_dir_importable(tmp_path: Path) -> None:
    cfg = make_job(tmp_path, STEPS)
    spec = spec_of(cfg)
    init_worker(spec)
    assert current_spec() is spec
    assert str(cfg.transform.base_dir) in sys.path
    other = spec_of(make_job(tmp_path, ""))
    init_worker(other)
    assert current_spec() is other


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def test_current_spec_before_init_worker_raises_in_a_fresh_process() -> None:
    proc = run_python(
        "from etl.transform.worker import current_spec\n"
        "try:\n"
        "    current_spec()\n"
        "except AssertionError as e:\n"
        "    print('AssertionError:', e)\n"
        "else:\n"
        "    print('no error')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "AssertionError: init_worker() was not called in this process"


def test_run_chunk_before_init_worker_raises_in_a_fresh_process() -> None:
    proc = run_python(
        "from etl.core.records import Chunk\n"
        "from etl.transform.worker import run_chunk\n"
        "run_chunk(Chunk(0, 'a.csv', 0, 2, 1, b'1\\n', kind='csv', columns=('a',)))\n"
    )
    assert proc.returncode != 0
    assert "AssertionError: init_worker() was not called in this process" in proc.stderr


def test_init_worker_ignore_sigint_in_a_fresh_process(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    cfg = make_job(tmp_path, "")
    code = (
        "import signal, sys\n"
        "from etl.core.config import load_job\n"
        "from etl.transform.worker import WorkerSpec, init_worker\n"
        f"cfg = load_job({str(tmp_path / 'job.toml')!r})\n"
        "spec = WorkerSpec(cfg.transform, cfg.output, cfg.read)\n"
        # a shell may start us with SIGINT ignored (a background job): begin from Python's default
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "init_worker(spec)\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
        "init_worker(spec, ignore_sigint=True)\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
        "print(sys.path[0])\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", str(cfg.transform.base_dir)]
    assert signal.getsignal(signal.SIGINT) is before  # this process untouched


def test_recv_message_reads_what_connection_send_wrote() -> None:
    """The worker pipe's reader: every message ``Connection.send`` writes (a small one, one
    past the 16 KiB where the header goes separately, 8 MiB of bytes in parts, as results
    carry them) comes back equal, in order, over a real socket pair."""
    ours, theirs = multiprocessing.Pipe()
    messages = [
        "ready",
        (True, b"x" * 20_000, ""),
        (True, [Part(f"m={i}/part-00000-000000.arrow", os.urandom(1 << 20) * 2, 7) for i in range(4)], ""),
    ]
    sender = threading.Thread(target=lambda: [theirs.send(m) for m in messages])  # 8 MiB blocks until read
    sender.start()
    try:
        assert [recv_message(ours) for _ in messages] == messages
    finally:
        sender.join()
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    "sent", [b"", struct.pack("!i", 1000) + b"y" * 10, b"\x00\x00"], ids=["nothing", "half a body", "half a header"]
)
def test_recv_message_end_of_file_is_eof_error(sent: bytes) -> None:
    """A worker (or parent) that dies before or in the middle of a message: EOFError, which
    the slot turns into WorkerCrashed and the worker loop into a clean exit."""
    ours, theirs = multiprocessing.Pipe()
    os.write(theirs.fileno(), sent)
    theirs.close()
    with pytest.raises(EOFError):
        recv_message(ours)
    ours.close()

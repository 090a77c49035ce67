"""etl.transform.probe: one real chunk measured in a real throw-away worker process."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl.core.config import JobConfig, load_job
from etl.core.records import Chunk, Source, StagedFile
from etl.read.formats import read_chunks
from etl.transform.probe import measure_in_worker
from etl.transform.worker import WorkerSpec
from tests.conftest import write_trips_csv

STEPS = """
  {op = "cast", columns = {trip_id = "int64", distance = "float64", fare = "float64"}},
  {op = "filter", expr = "distance > 1"},
"""


def make_job(folder: Path, executor: str, read: str = "chunk_rows = 500", steps: str = STEPS) -> JobConfig:
    job = folder / f"job-{executor}.toml"
    job.write_text(f"""
[job]
name = "probe-test"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[read]
{read}

[transform]
executor = "{executor}"
workers = 1
steps = [
{steps}
]

[output]
path = "out"
""")
    return load_job(job)


def spec_of(cfg: JobConfig) -> WorkerSpec:
    return WorkerSpec(cfg.transform, cfg.output, cfg.read)


@pytest.fixture
def trips(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "trips.csv"
    write_trips_csv(path, rows=1500, seed=4)
    return path


def first_chunk(path: Path, cfg: JobConfig) -> Chunk:
    source = Source(0, str(path), path.name, "csv")
    return next(iter(read_chunks(StagedFile(source, path, path.stat().st_size), cfg.read)))


@pytest.mark.parametrize("read", ["chunk_rows = 500", 'chunk_rows = 500\nparse = "reader"'])
def test_process_spec_measures_base_work_frame_and_result(tmp_path: Path, trips: Path, read: str) -> None:
    cfg = make_job(tmp_path, "process", read)
    found = measure_in_worker(spec_of(cfg), first_chunk(trips, cfg))
    assert set(found) == {"base", "work", "frame", "result"}
    assert found["base"] > 0
    assert found["work"] >= 0
    assert found["frame"] > 0
    assert found["result"] > 0
    assert all(isinstance(v, int) for v in found.values())


def test_result_is_the_encoded_size_of_the_chunks_output(tmp_path: Path, trips: Path) -> None:
    from etl.transform.worker import init_worker, run_chunk

    cfg = make_job(tmp_path, "process")
    chunk = first_chunk(trips, cfg)
    found = measure_in_worker(spec_of(cfg), chunk)
    init_worker(spec_of(cfg))
    assert found["result"] == run_chunk(chunk).nbytes  # encoding is deterministic


@pytest.mark.parametrize("executor", ["thread", "serial"])
def test_thread_spec_reports_no_base(tmp_path: Path, trips: Path, executor: str) -> None:
    cfg = make_job(tmp_path, executor)
    found = measure_in_worker(spec_of(cfg), first_chunk(trips, cfg))
    assert found["base"] == 0  # threads share the parent, counted already
    assert found["work"] >= 0 and found["frame"] > 0 and found["result"] > 0


@pytest.mark.parametrize("executor", ["thread", "serial"])
def test_thread_spec_without_chunk_is_base_zero(tmp_path: Path, executor: str) -> None:
    cfg = make_job(tmp_path, executor)
    assert measure_in_worker(spec_of(cfg), None) == {"base": 0}


def test_process_spec_without_chunk_measures_only_base(tmp_path: Path) -> None:
    cfg = make_job(tmp_path, "process")
    found = measure_in_worker(spec_of(cfg), None)
    assert set(found) == {"base"} and found["base"] > 0


def test_chunk_that_fails_its_steps_falls_back_to_base_only(tmp_path: Path, trips: Path) -> None:
    # "note" holds words: the cast fails under on_error = "fail", in the warm-up already
    cfg = make_job(tmp_path, "process", steps='{op = "cast", columns = {note = "float64"}},')
    found = measure_in_worker(spec_of(cfg), first_chunk(trips, cfg))
    assert set(found) == {"base"} and found["base"] > 0


def test_frame_grows_with_the_chunk(tmp_path: Path, trips: Path) -> None:
    small_cfg = make_job(tmp_path, "process", 'chunk_rows = 100\nparse = "reader"')
    big_cfg = make_job(tmp_path, "process", 'chunk_rows = 1500\nparse = "reader"')
    small = measure_in_worker(spec_of(small_cfg), first_chunk(trips, small_cfg))
    big = measure_in_worker(spec_of(big_cfg), first_chunk(trips, big_cfg))
    assert big["frame"] > small["frame"]
    assert big["result"] > small["result"]

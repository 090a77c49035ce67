"""Resources: cgroup limits, the memory budget, the sizing plan and the runtime memory guard.

The end-to-end tests run the real CLI (real worker processes) on a synthetic dataset many
times larger than the memory limit, and read the peak process-tree RSS the run sampled.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from etl.core.config import JobConfig
from etl.core.machine import Machine
from etl.core.units import parse_size
from etl.ops.datagen import generate
from etl.run.resources import PLAN_SHARE, CostModel, Layout, Probe, in_process_if_small, memory_budget, plan_for

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "cgroup"
MiB = 1 << 20


# ----------------------------------------------------------------------------- budget


def test_budget_forms() -> None:
    usable = 8 << 30
    assert memory_budget("4GiB", usable, cpus=2) == 4 << 30
    assert memory_budget("25%", usable, cpus=2) == 2 << 30
    auto = memory_budget("auto", usable, cpus=2)
    assert 0 < auto <= usable // 2  # a safe share, never all of it
    assert memory_budget("auto", usable, cpus=64) > auto  # more CPUs may use more of it


def test_budget_above_usable_memory_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    assert memory_budget("64GiB", 4 << 30, cpus=2) == 4 << 30
    assert "more than the" in caplog.text


# ------------------------------------------------------------------------------- plan


def job(**sections: dict) -> JobConfig:
    raw = {"job": {"name": "t"}, "sources": {"urls": ["x.csv"]}, "output": {"path": "out"}, **sections}
    return JobConfig.model_validate(raw)


def probe(work_per_row: int = 1000) -> Probe:
    rows = 50_000
    return Probe(
        rows=rows,
        chunk_bytes=130 * rows,
        reader_bytes=120 * MiB,
        parent_base=140 * MiB,
        worker_base=130 * MiB,
        worker_work=work_per_row * rows,
        result_bytes=30 * rows,
        servers=140 * MiB,
        measured="test",
    )


def box(cpus: int) -> Machine:
    return Machine(cpus, 64 << 30, cpus, None, None, 64 << 30)


@pytest.mark.parametrize("budget_mib", [700, 1024, 2048, 8192])
def test_plan_fits_the_budget_when_it_says_it_does(budget_mib: int) -> None:
    plan = plan_for(job(), box(8), budget_mib * MiB, probe())
    assert plan.fits
    assert plan.estimated_peak <= budget_mib * MiB * PLAN_SHARE
    assert 1 <= plan.workers <= 8
    assert f"{plan.workers} workers" in plan.decision and "8 CPUs usable" in plan.decision


def test_more_budget_never_means_fewer_workers_or_smaller_chunks() -> None:
    plans = [plan_for(job(), box(8), mib * MiB, probe()) for mib in (700, 1024, 2048, 8192)]
    assert [p.workers for p in plans] == sorted(p.workers for p in plans)
    assert plans[0].workers < plans[-1].workers == 8
    assert plans[-1].chunk_rows == job().read.chunk_rows


def test_heavier_rows_get_smaller_chunks_or_fewer_workers() -> None:
    light = plan_for(job(), box(4), 1536 * MiB, probe(work_per_row=500))
    heavy = plan_for(job(), box(4), 1536 * MiB, probe(work_per_row=4000))
    assert heavy.workers * heavy.chunk_rows < light.workers * light.chunk_rows


def test_explicit_settings_are_honoured_and_flagged_when_they_cannot_fit() -> None:
    cfg = job(transform={"workers": 6}, read={"chunk_rows": 400_000})
    plan = plan_for(cfg, box(2), 1 << 30, probe())
    assert (plan.workers, plan.chunk_rows) == (6, 400_000)
    assert not plan.fits
    assert "does not fit" in plan.decision and "resources.memory_limit" in plan.decision


def test_a_budget_with_no_room_for_processes_runs_threads_and_one_writer() -> None:
    small = 64 << 20  # below three times this process's RSS
    cfg, note = in_process_if_small(job(), small)
    assert (cfg.transform.executor, cfg.output.writer_threads) == ("thread", 1)
    assert "this process's threads" in note and "one writer thread" in note
    assert plan_for(cfg, box(2), small, probe()).writer_threads == 1
    mine, note = in_process_if_small(job(output={"path": "out", "writer_threads": 3}), small)
    assert (mine.transform.executor, mine.output.writer_threads) == ("thread", 3)  # set in the job: kept
    roomy, note = in_process_if_small(job(), 8 << 30)
    assert (roomy.transform.executor, roomy.output.writer_threads, note) == ("process", 2, "")


def measured_probe() -> Probe:
    """What the probe measured in the parent for the benchmark job (4 M rows over HTTP) at 300 MiB."""
    rows = 49_673
    return Probe(
        rows=rows,
        chunk_bytes=4_748_108,
        reader_bytes=13_228_032,
        parent_base=151_248_896,
        worker_base=0,
        worker_work=21_180_416,
        result_bytes=5_985_568,  # 120 B a row: a 131,072-row group is 15 MiB of Arrow
        measured="trips-000.csv (first 4096 KiB)",
        chunk_cap_bytes=32 * MiB,
    )


def test_in_parent_plan_leaves_room_for_each_writer_threads_row_group_encode() -> None:
    """The 300 MiB run peaked at the plan's worst case plus one row group's encode (232 +
    45 MiB; measured 270-304 MiB): the plan counts the encode, per writer thread."""
    p, budget = measured_probe(), 300 * MiB

    def threads(**output: int) -> JobConfig:  # what in_process_if_small makes of a small budget
        return job(transform={"executor": "thread"}, output={"path": "out", "writer_threads": 1, **output})

    model = CostModel(threads(), p)
    group = p.per_row("result_bytes") * threads().output.row_group_size
    assert model.encode() == int(3 * group) and 40 * MiB < model.encode() < 50 * MiB
    plan = plan_for(threads(), box(2), budget, p)
    assert plan.fits and plan.estimated_peak <= budget * PLAN_SHARE
    lay = Layout(plan.workers, plan.chunk_rows, plan.chunks_queue_items, plan.in_flight, plan.read_threads)
    assert plan.estimated_peak == model.total(lay) >= p.parent_base + model.encode()
    assert "1 writer encoding 45 MiB" in plan.decision
    # the next bigger chunks, the plan before the encode was counted, pass the share with it
    bigger = replace(lay, chunk_rows=plan.chunk_rows * 2)
    assert model.total(bigger) > budget * PLAN_SHARE >= model.total(bigger) - model.encode()
    # two writer threads encode two row groups at once: a smaller layout, or a plan that says it does not fit
    two = plan_for(threads(writer_threads=2), box(2), budget, p)
    assert not two.fits or two.workers * two.chunk_rows < plan.workers * plan.chunk_rows
    assert CostModel(threads(writer_threads=2), p).encode() == 2 * model.encode()
    # smaller row groups encode in less: bigger chunks fit
    assert plan_for(threads(row_group_size=16_384), box(2), budget, p).chunk_rows > plan.chunk_rows
    # worker processes' plans are left as they were (see CostModel.encode)
    procs = job(output={"path": "out", "writer_threads": 1})
    assert "encoding" not in plan_for(procs, box(2), 1 << 30, p).decision


def test_serial_executor_plans_one_worker() -> None:
    plan = plan_for(job(transform={"executor": "serial"}), box(8), 8 << 30, probe())
    assert plan.workers == 1


def test_queue_bounds_hold_the_planned_chunks() -> None:
    p = probe()
    plan = plan_for(job(), box(2), 2 << 30, p)
    chunk = p.chunk_bytes / p.rows * plan.chunk_rows
    assert plan.chunks_queue_bytes >= plan.chunks_queue_items * chunk  # a full queue is not refused
    assert plan.chunks_queue_bytes <= 2 * plan.chunks_queue_items * chunk  # and holds no more than planned


# ------------------------------------------------------------------------- end to end

JOB = """
[job]
name = "mem"
state_dir = "state"

[sources]
urls = ["data/trips-*.csv.gz"]

[transform]
steps = [
  {{op = "fillna", values = {{payment_type = "unknown"}}}},
  {{op = "cast", columns = {{trip_id = "int64", passenger_count = "Int64", trip_distance = "float64", fare_amount = "float64", tip_amount = "float64", pickup_zone = "Int64"}}}},
  {{op = "parse_datetime", columns = ["pickup_at", "dropoff_at"], format = "%Y-%m-%d %H:%M:%S"}},
  {{op = "filter", expr = "fare_amount >= 0 and trip_distance > 0"}},
  {{op = "fillna", values = {{tip_amount = 0.0}}}},
  {{op = "derive", columns = {{minutes = "round(minutes(dropoff_at - pickup_at), 1)", month = 'strftime(pickup_at, "%Y-%m")'}}}},
  {{op = "lookup", path = "data/zones.csv", on = "pickup_zone", right_on = "zone_id", columns = ["borough"]}},
]

[output]
path = "{out}"
partition_by = ["month"]

[resources]
memory_limit = "{limit}"
"""


@pytest.fixture(scope="module")
def big_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mem")
    generate(root / "data", rows=2_000_000, files=4, seed=5)
    return root


def run_job(root: Path, name: str, limit: str) -> dict:
    cfg = root / f"{name}.toml"
    cfg.write_text(JOB.format(out=f"out-{name}", limit=limit))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(cfg), "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted((root / "state" / "mem" / "reports").glob("run-*.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(reports[-1].read_text())["summary"]
    summary["stderr"] = proc.stderr
    return summary


def output_rows(folder: Path) -> int:
    return ds.dataset(folder, format="parquet", partitioning="hive").count_rows()


@pytest.fixture(scope="module")
def free_run(big_data: Path) -> dict:
    return run_job(big_data, "free", "8GiB")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("limit", "executor"), [("300MiB", "thread"), ("768MiB", "process")])
def test_small_memory_limit_on_much_larger_data(big_data: Path, free_run: dict, limit: str, executor: str) -> None:
    small = run_job(big_data, f"small-{limit}", limit)
    free = free_run
    # 300 MiB cannot hold a fork server and a worker beside the parent: the plan says so
    assert small["plan"]["executor"] == executor and free["plan"]["executor"] == "process"
    if executor == "thread":
        assert "no room for worker processes" in small["plan"]["decision"]
    # 2M rows decode to 1.3-2 GB of pandas frames in a worker (by allocator): more than the limit
    assert small["plan"]["probe"]["worker_work"] / small["plan"]["probe"]["rows"] * 2_000_000 > parse_size(limit)
    assert small["rows_in"] == free["rows_in"] == 2_000_000
    assert small["rows_out"] == free["rows_out"] == output_rows(big_data / f"out-small-{limit}") > 0
    assert small["memory"]["samples"] > 0
    assert small["memory"]["peak_rss_bytes"] < parse_size(limit)
    assert small["plan"]["budget"] == parse_size(limit)
    assert small["plan"]["workers"] <= free["plan"]["workers"]
    assert "transform:" in small["stderr"] or small["plan"]["decision"].startswith("transform:")


@pytest.mark.timeout(240)
def test_budget_below_the_fixed_cost_still_finishes_one_chunk_at_a_time(big_data: Path, tmp_path: Path) -> None:
    root = tmp_path
    (root / "data").mkdir()
    generate(root / "data", rows=200_000, files=2, seed=6)
    summary = run_job(root, "tiny", "64MiB")
    assert summary["rows_in"] == 200_000
    assert summary["rows_out"] == output_rows(root / "out-tiny") > 0
    assert not summary["plan"]["fits"]
    assert summary["memory"]["forced_admits"] > 0  # ran alone rather than deadlocking
    assert "no chunk in flight" in summary["stderr"]


# ------------------------------------------------------------------- remote probe

PROBE_JOB = """
[job]
name = "probe"
state_dir = "{state}"

[sources]
urls = ["{url}"]
format = "csv"

[transform]
steps = [{{op = "cast", columns = {{trip_id = "int64", fare_amount = "float64"}}}}]

[output]
path = "{out}"
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("served", [True, False])
def test_remote_only_job_is_measured_on_the_head_of_its_first_source(tmp_path: Path, served: bool) -> None:
    from etl.core.config import load_job
    from etl.download.sources import expand_sources
    from etl.run.pipeline import measure
    from tests.http_server import serve_folder_in_thread

    data = tmp_path / "data"
    data.mkdir()
    generate(data, rows=300_000, files=1, seed=3)  # ~10 MB gzip: more than the sample
    (name,) = [p.name for p in data.glob("*.csv.gz")]
    base, stop = serve_folder_in_thread(data)
    try:
        url = f"{base}/{name if served else 'missing.csv.gz'}"
        remote = load_job(
            _write(tmp_path / "remote.toml", PROBE_JOB.format(state=tmp_path / "s", url=url, out=tmp_path / "o"))
        )
        local = load_job(
            _write(tmp_path / "local.toml", PROBE_JOB.format(state=tmp_path / "s", url=data / name, out=tmp_path / "o"))
        )
        got, expected = measure(remote, expand_sources(remote)), measure(local, expand_sources(local))
    finally:
        stop()
    if not served:  # a 404: the run reports it; the plan falls back to estimates
        assert got.measured == "fallback"
        return
    assert got.measured.startswith(name.removesuffix(".gz")) and "first" in got.measured
    assert got.rows == expected.rows  # the sample holds the probe's 50k rows
    assert got.per_row("chunk_bytes") == pytest.approx(expected.per_row("chunk_bytes"), rel=0.05)
    assert got.per_row("result_bytes") == pytest.approx(expected.per_row("result_bytes"), rel=0.2)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.timeout(120)
def test_remote_job_rerun_is_measured_on_its_staged_copy_without_a_request(tmp_path: Path) -> None:
    from etl.core.config import load_job
    from etl.download.sources import expand_sources
    from etl.run.pipeline import measure

    url = "http://127.0.0.1:9/trips-000.csv.gz"  # the discard port: nothing answers there
    cfg = load_job(_write(tmp_path / "job.toml", PROBE_JOB.format(state=tmp_path / "s", url=url, out=tmp_path / "o")))
    staging = cfg.job_state_dir / "staging"
    generate(staging, rows=60_000, files=1, seed=4)
    (staged,) = staging.glob("*.csv.gz")
    staged.rename(staging / "trips-000.csv.gz")

    probe = measure(cfg, expand_sources(cfg))

    assert probe.measured == "trips-000.csv.gz" and probe.rows > 40_000  # ~50k lines: the probe's chunk


def wide_probe(cap: int) -> Probe:
    """What the probe measures on 20 KB rows: its chunk stops at 32 MiB of text (1,676 rows)."""
    rows = 1_676
    return Probe(
        rows=rows,
        chunk_bytes=20_000 * rows,
        reader_bytes=170 * MiB,
        parent_base=150 * MiB,
        worker_base=130 * MiB,
        worker_work=115 * MiB,
        result_bytes=20_000 * rows,
        servers=140 * MiB,
        measured="wide.csv",
        chunk_cap_bytes=cap,
    )


def test_wide_rows_are_planned_at_the_chunk_byte_cap_not_at_chunk_rows() -> None:
    rows = job().read.chunk_rows
    assert CostModel(job(), wide_probe(cap=0)).chunk(rows) > 1 << 30  # the issue: GBs a chunk, one worker
    capped = CostModel(job(), wide_probe(cap=32 * MiB))
    assert capped.held(rows) == 1_677 and capped.chunk(rows) <= 32 * MiB
    plan = plan_for(job(), box(2), 1 << 30, wide_probe(cap=32 * MiB))
    assert plan.fits and plan.estimated_peak <= (1 << 30) * PLAN_SHARE
    # chunks below MIN_CHUNK_ROWS rows, still of several MiB
    assert plan.chunk_rows < 10_000 and plan.chunk_rows * 20_000 >= 4 * MiB
    assert "wide rows" in plan.decision or plan.chunk_rows < 1_677


def test_narrow_rows_keep_the_row_floor() -> None:
    plan = plan_for(job(), box(2), 300 * MiB, probe(work_per_row=4000))
    assert plan.chunk_rows >= 10_000  # 130 B rows: 10,000 rows is 1.3 MiB, below MIN_CHUNK_BYTES

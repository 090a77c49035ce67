"""``run.py bench``: grid runs write CSV/JSON/plots, Ctrl-C keeps measured points, --auto finds the best.

End to end through ``run.py bench`` (real runs of a job whose transform cost is known), and
the table, recommendation and plots on hand-made results. The search logic of --auto alone
is in test_bench_search.py; the runner's helpers in test_bench_runs.py.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from etl.ops.bench import format_table
from etl.ops.bench_runs import Point, PointResult, point_key

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Every bench run is a fresh interpreter (honest RSS), a few seconds each on a busy machine.
pytestmark = pytest.mark.timeout(600)

# A transform whose cost per chunk is known: a fixed cost plus a cost growing with the square
# of the chunk's rows, slept in the run's own process only: the planner's probe (a child
# process) runs a chunk too, and its one-off cost, which also depends on the chunk size,
# would blur the model. Sleeping threads overlap fully, so more workers is strictly better.
# Sleeps only on the transform stage's threads: the planner measures a chunk before the run
# (for the thread executor, in the parent), and a sleep there would cost every point alike.
COST_UDF = """
import threading
import time

def cost(df, *, fixed, per_row_sq):
    if threading.current_thread().name.startswith("transform"):
        time.sleep(fixed + per_row_sq * len(df) ** 2)
    return df
"""


def _dataset(folder: Path, files: int, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        lines = ["id,value,label"] + [f"{k * rows + i},{i * 0.5},L{i % 7}" for i in range(rows)]
        (folder / f"part-{k}.csv").write_text("\n".join(lines) + "\n")
    return folder


def _job(tmp_path: Path, data: Path, *, workers: int, chunk_rows: int, fixed: float, per_row_sq: float) -> Path:
    (tmp_path / "cost_udf.py").write_text(COST_UDF)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
name = "benchjob"
state_dir = "state"
[sources]
urls = ["{data}/part-*.csv"]
[read]
chunk_rows = {chunk_rows}
[transform]
executor = "thread"
workers = {workers}
[[transform.steps]]
op = "python"
function = "cost_udf:cost"
params = {{ fixed = {fixed}, per_row_sq = {per_row_sq} }}
[output]
path = "out"
format = "csv"
""")
    return job


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run.py", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_grid_2x2_repeat_2_writes_csv_json_and_plots(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", files=2, rows=300)
    job = _job(tmp_path, data, workers=1, chunk_rows=100, fixed=0.0, per_row_sq=0.0)
    out = tmp_path / "bench"
    proc = _bench(
        "--config",
        str(job),
        "--vary",
        "transform.workers=1,2",
        "--vary",
        "read.chunk_rows=100,300",
        "--repeat",
        "2",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("] transform.workers=") == 8  # one progress line per run, naming its point
    assert proc.stdout.count("(round 2/2)") == 4  # points run in rounds, not back to back
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert {(r["transform.workers"], r["read.chunk_rows"]) for r in rows} == {
        ("1", "100"),
        ("1", "300"),
        ("2", "100"),
        ("2", "300"),
    }
    assert all(r["runs"] == "2" for r in rows)
    speeds = [float(r["rows_per_s_median"]) for r in rows]
    assert speeds == sorted(speeds, reverse=True)  # sorted by throughput
    for r in rows:
        assert float(r["wall_s_min"]) <= float(r["wall_s_median"]) <= float(r["wall_s_max"])
        assert float(r["peak_rss_mib"]) > 0 and r["bottleneck"] in ("download", "read", "transform", "write")
    doc = json.loads((out / "bench.json").read_text())
    assert doc["runs"] == 8 and len(doc["points"]) == 4
    for p in doc["points"]:
        assert len(p["run_metrics"]) == 2
        assert all(m["rows_in"] == 600 for m in p["run_metrics"])  # same input for every run
    best = doc["points"][0]["point"]
    assert (
        doc["recommended"]
        == f"--set transform.workers={best['transform.workers']} --set read.chunk_rows={best['read.chunk_rows']}"
    )
    assert f"recommended: {doc['recommended']}" in proc.stdout
    for name in ("throughput_transform_workers.png", "throughput_read_chunk_rows.png", "stages_best_worst.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # each run had its own output folder, removed after measuring; its report is kept
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == 8
    assert all(
        not (d / "output").exists() and list((d / "state" / "benchjob" / "reports").glob("*.json")) for d in run_dirs
    )


def test_auto_finds_the_known_best_point_with_fewer_runs_than_the_grid(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = _dataset(tmp_path / "data", files=4, rows=600)
    # start away from the best: two workers, whole-file chunks
    # per chunk: 0.6 s + 1.5e-5 s x rows^2 of sleep. A 600-row file is read as 1, 3 or 7
    # chunks at chunk_rows 600, 300 or 100 (the cut follows the bytes), so with 4 workers the
    # chunks take ~3 rounds of ~1.2 s at 300 against 1 x 6 s at 600 and 7 x 0.7 s at 100:
    # a second or more per run over both neighbours, well above one run's noise
    job = _job(tmp_path, data, workers=2, chunk_rows=600, fixed=0.6, per_row_sq=1.5e-5)
    # run outputs on tmpfs when there is one: publish's fsyncs on a shared disk are noise here
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path / "auto"
    request.addfinalizer(lambda: shutil.rmtree(out, ignore_errors=True))
    proc = _bench(
        "--config",
        str(job),
        "--auto",
        "--vary",
        "transform.workers=1,2,4",
        "--vary",
        "read.chunk_rows=100,300,600",
        "--vary",
        "download.concurrency=8",
        "--repeat",
        "1",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert doc["mode"] == "auto"
    assert doc["auto_best"] == {"transform.workers": "4", "read.chunk_rows": "300", "download.concurrency": "8"}, (
        proc.stdout
    )
    assert doc["recommended"] == "--set transform.workers=4 --set read.chunk_rows=300 --set download.concurrency=8"
    assert doc["runs"] < 9  # the full 3x3 grid needs 9 runs


def test_a_run_held_back_by_the_memory_guard_is_named_and_flagged(tmp_path: Path) -> None:
    # A 100 MiB budget is under the parent's own RSS (pandas, pyarrow): the guard holds every
    # chunk back while another runs, so chunks run one at a time though 2 workers could take
    # two; each chunk sleeps 0.3 s, so most of the run is spent held back. The plan cannot fit.
    data = _dataset(tmp_path / "data", files=2, rows=300)
    job = _job(tmp_path, data, workers=2, chunk_rows=100, fixed=0.3, per_row_sq=0.0)
    out = tmp_path / "bench"
    proc = _bench(
        "--config",
        str(job),
        "--set",
        'resources.memory_limit="100MiB"',
        "--vary",
        "transform.workers=2",
        "--repeat",
        "1",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    (point,) = json.loads((out / "bench.json").read_text())["points"]
    run = point["run_metrics"][0]
    assert run["bottleneck"] == "memory" and run["held_back_s"] > 0 and run["plan"]["fits"] is False
    assert point["fits_budget"] is False
    assert "memory (chunks held back" in proc.stdout and "OVER BUDGET" in proc.stdout
    # the recommendation raises the budget to what the point needs
    assert "recommended: --set transform.workers=2 --set resources.memory_limit=" in proc.stdout
    (report,) = (out / "runs" / "r001" / "state" / "benchjob" / "reports").glob("run-*.json")
    b = json.loads(report.read_text())["summary"]["stats"]["bottleneck"]
    assert b["stage"] == "memory" and b["budget_bytes"] == 100 << 20 and b["held_back_s"] > 0


def test_ctrl_c_stops_cleanly_and_keeps_measured_points(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", files=2, rows=300)
    job = _job(tmp_path, data, workers=1, chunk_rows=100, fixed=0.2, per_row_sq=0.0)
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "run.py",
        "bench",
        "--config",
        str(job),
        "--vary",
        "transform.workers=1,2,3,4",
        "--repeat",
        "1",
        "--out",
        str(out),
    ]
    # SIGINT as at a terminal, even when this suite was started with it ignored (a background job)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and not line.startswith("[1/4]"):
            line = proc.stdout.readline()
        assert line.startswith("[1/4]"), proc.stderr.read() if proc.stderr else ""
        children = psutil.Process(proc.pid).children(recursive=True)  # the second point's run
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert 1 <= len(rows) < 4 and rows[0]["runs"] == "1"
    assert len(json.loads((out / "bench.json").read_text())["points"]) == len(rows)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_a_bad_key_fails_before_any_run(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", files=1, rows=10)
    job = _job(tmp_path, data, workers=1, chunk_rows=100, fixed=0.0, per_row_sq=0.0)
    proc = _bench("--config", str(job), "--vary", "transform.wrokers=1,2", "--out", str(tmp_path / "b"), timeout=30)
    assert proc.returncode == 2
    assert "transform.wrokers" in proc.stderr and "unknown key" in proc.stderr
    assert not (tmp_path / "b" / "runs").exists()


# ------------------------------------------------------------ table, recommendation, plots


def _point(workers: int, speeds: list[float]) -> PointResult:
    """A point as bench records it: one metrics dict per run (per-stage busy/wait/blocked, slots)."""
    stages = {
        "read": {"busy_s": 1.0, "wait_s": 0.5, "blocked_s": 0.25, "slots": 2},
        "transform": {"busy_s": 4.0, "wait_s": 1.0, "blocked_s": 0.0, "slots": workers},
    }
    return PointResult({"transform.workers": str(workers)}, [{"rows_per_s": v, "stages": stages} for v in speeds])


def test_throughput_plot_starts_at_zero_and_shows_the_spread_of_repeats() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from etl.ops.bench import throughput_figure

    results = [_point(2, [950_000.0, 1_000_000.0, 1_020_000.0]), _point(1, [900_000.0, 930_000.0, 960_000.0])]
    fig = throughput_figure(results, ["transform.workers"], "transform.workers")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1_020_000  # a 10% gain does not look like 10x
    (bars,) = ax.containers  # one series: median with min-max error bars
    line, _, (vertical,) = bars
    assert list(line.get_ydata()) == [930_000.0, 1_000_000.0]
    spans = [(float(seg[0][1]), float(seg[1][1])) for seg in vertical.get_segments()]
    assert spans == [(900_000.0, 960_000.0), (950_000.0, 1_020_000.0)]
    assert "min-max" in ax.get_ylabel()
    plt.close(fig)


def test_stage_plot_shows_per_slot_and_total_worker_time() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from etl.ops.bench import stages_figure

    fig = stages_figure([_point(4, [1.0]), _point(1, [0.5])])
    (per_slot_best, per_slot_worst), (total_best, total_worst) = [fig.axes[:2], fig.axes[2:]]

    def busy(ax: Any) -> dict[str, float]:  # the first bars drawn are "busy", one per stage, in stage order
        return dict(zip(("read", "transform"), [p.get_height() for p in ax.patches[:2]]))

    assert busy(per_slot_best) == {"read": 1.0, "transform": 4.0} == busy(per_slot_worst)
    assert busy(total_best) == {"read": 2.0, "transform": 16.0}  # 4 workers x 4 s
    assert busy(total_worst) == {"read": 2.0, "transform": 4.0}
    assert "all slots" in total_best.get_ylabel() and "4x" in [t.get_text() for t in total_best.texts]
    plt.close(fig)


VARY_KEYS = ["transform.workers", "read.chunk_rows", "download.concurrency"]


def _p(workers: str, chunk: str, conc: str) -> Point:
    return {"transform.workers": workers, "read.chunk_rows": chunk, "download.concurrency": conc}


def _run(rows_per_s: float, *, fits: bool, held: float, bottleneck: str) -> dict[str, Any]:
    plan = {"workers": 2, "chunk_rows": 200_000, "budget": 1 << 30, "estimated_peak": 1100 << 20, "fits": fits}
    return {
        "rows_per_s": rows_per_s,
        "wall_s": 1.0,
        "mib_per_s": 1.0,
        "peak_rss_mib": 900.0,
        "cpu_util": 0.5,
        "bottleneck": bottleneck,
        "held_back_s": held,
        "plan": plan,
    }


def test_the_table_flags_points_over_the_budget_and_the_recommendation_raises_it() -> None:
    over = PointResult(_p("2", "200000", "8"), [_run(120_000.0, fits=False, held=3.2, bottleneck="memory")] * 3)
    fine = PointResult(_p("2", "100000", "8"), [_run(100_000.0, fits=True, held=0.0, bottleneck="transform")] * 3)
    bench = SimpleNamespace(results={point_key(r.point): r for r in (over, fine)})
    table = format_table(bench, VARY_KEYS, {"mode": "grid"})  # type: ignore[arg-type]
    lines = table.splitlines()
    assert lines[1].endswith("memory (chunks held back 3.2s) OVER BUDGET") and lines[2].endswith("  transform")
    assert "OVER BUDGET: the settings do not fit the memory budget" in table
    # the fastest point needs more memory than the budget: the line says how much (1100 MiB / 0.8)
    assert table.splitlines()[-1] == (
        "recommended: --set transform.workers=2 --set read.chunk_rows=200000 --set download.concurrency=8 "
        "--set resources.memory_limit=1536MiB"
    )
    assert over.row()["fits_budget"] is False and over.row()["held_back_s"] == 3.2

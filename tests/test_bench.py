"""``run.py bench``: grid runs write CSV/JSON/plots, Ctrl-C keeps measured points, --auto finds the best."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from etl.bench import grid, parse_vary
from etl.errors import ConfigError

ROOT = Path(__file__).parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Every bench run is a fresh interpreter (honest RSS), a few seconds each on a busy machine.
pytestmark = pytest.mark.timeout(600)

# A transform whose cost per chunk is known: a fixed cost plus a cost growing with the square
# of the chunk's rows. With 600-row files, chunks of 300 rows are cheapest in total
# (2 x 0.425 s per file) against 100 rows (6 x 0.225 s) and 600 rows (1 x 1.1 s), and
# sleeping threads overlap fully, so more workers is strictly better.
COST_UDF = '''
import time

def cost(df, *, fixed, per_row_sq):
    time.sleep(fixed + per_row_sq * len(df) ** 2)
    return df
'''


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
    return subprocess.run([sys.executable, "run.py", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_grid_2x2_repeat_2_writes_csv_json_and_plots(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", files=2, rows=300)
    job = _job(tmp_path, data, workers=1, chunk_rows=100, fixed=0.0, per_row_sq=0.0)
    out = tmp_path / "bench"
    proc = _bench("--config", str(job), "--vary", "transform.workers=1,2", "--vary", "read.chunk_rows=100,300",
                  "--repeat", "2", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("] transform.workers=") == 4  # one progress line per point
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert {(r["transform.workers"], r["read.chunk_rows"]) for r in rows} == {("1", "100"), ("1", "300"), ("2", "100"), ("2", "300")}
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
    assert doc["recommended"] == f"--set transform.workers={best['transform.workers']} --set read.chunk_rows={best['read.chunk_rows']}"
    assert f"recommended: {doc['recommended']}" in proc.stdout
    for name in ("throughput_transform_workers.png", "throughput_read_chunk_rows.png", "stages_best_worst.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # each run had its own output folder, removed after measuring; its report is kept
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == 8
    assert all(not (d / "output").exists() and list((d / "state" / "benchjob" / "reports").glob("*.json")) for d in run_dirs)


def test_auto_finds_the_known_best_point_with_fewer_runs_than_the_grid(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    data = _dataset(tmp_path / "data", files=4, rows=600)
    # start far from the best: one worker, whole-file chunks
    job = _job(tmp_path, data, workers=1, chunk_rows=600, fixed=0.2, per_row_sq=2.5e-6)
    # run outputs on tmpfs when there is one: publish's fsyncs on a shared disk are noise here
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path / "auto"
    request.addfinalizer(lambda: shutil.rmtree(out, ignore_errors=True))
    proc = _bench("--config", str(job), "--auto", "--vary", "transform.workers=1,2,4",
                  "--vary", "read.chunk_rows=100,300,600", "--vary", "download.concurrency=8",
                  "--repeat", "1", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert doc["mode"] == "auto"
    assert doc["auto_best"] == {"transform.workers": "4", "read.chunk_rows": "300", "download.concurrency": "8"}
    assert doc["recommended"] == "--set transform.workers=4 --set read.chunk_rows=300 --set download.concurrency=8"
    assert doc["runs"] < 9  # the full 3x3 grid needs 9 runs


def test_ctrl_c_stops_cleanly_and_keeps_measured_points(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", files=2, rows=300)
    job = _job(tmp_path, data, workers=1, chunk_rows=100, fixed=0.2, per_row_sq=0.0)
    out = tmp_path / "bench"
    cmd = [sys.executable, "run.py", "bench", "--config", str(job), "--vary", "transform.workers=1,2,3,4",
           "--repeat", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_vary_parsing_and_grid() -> None:
    vary = parse_vary(["transform.workers=1,2,4", "read.chunk_rows=50000,200000"])
    assert len(grid(vary)) == 6
    assert grid(vary)[0] == {"transform.workers": "1", "read.chunk_rows": "50000"}
    with pytest.raises(ConfigError, match="--vary expects"):
        parse_vary(["transform.workers"])


def test_a_bad_key_fails_before_any_run(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", files=1, rows=10)
    job = _job(tmp_path, data, workers=1, chunk_rows=100, fixed=0.0, per_row_sq=0.0)
    proc = _bench("--config", str(job), "--vary", "transform.wrokers=1,2", "--out", str(tmp_path / "b"), timeout=30)
    assert proc.returncode == 2
    assert "transform.wrokers" in proc.stderr and "unknown key" in proc.stderr
    assert not (tmp_path / "b" / "runs").exists()

"""Per-stage statistics: the accounting adds up, items are conserved, the bottleneck is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from etl.core import stats
from etl.core.config import load_job
from etl.core.stats import MEMORY_LIMIT_SHARE, STAGES, TreeSampler, bottleneck, bottleneck_line
from etl.ops.report import format_summary
from etl.run.pipeline import RunOptions, run_job

# Slot accounting may lose a little to scheduling between "item finished" and "next item
# taken"; it must never double count. Tolerances are about that, not about speed.
ACCOUNT_ABS_S = 0.05
ACCOUNT_REL = 0.02

SLOW_UDF = """
import time

def slow(df, *, seconds):
    time.sleep(seconds)  # stands in for CPU-heavy work; releases the GIL like numpy would
    return df
"""


def _job(tmp_path: Path, trips_dir: Path, executor: str, workers: int, sleep: float) -> Path:
    (tmp_path / "slow_udf.py").write_text(SLOW_UDF)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
name = "stats"
state_dir = "state"
[sources]
urls = ["{trips_dir}/trips-*.csv"]
[read]
chunk_rows = 100
[transform]
executor = "{executor}"
workers = {workers}
[[transform.steps]]
op = "python"
function = "slow_udf:slow"
params = {{ seconds = {sleep} }}
[output]
path = "out"
format = "csv"
""")
    return job


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_stage_accounting_adds_up_and_items_are_conserved(tmp_path: Path, trips_dir: Path, executor: str) -> None:
    cfg = load_job(_job(tmp_path, trips_dir, executor, workers=2, sleep=0.03))
    s = await run_job(cfg, RunOptions())
    st = s.stats
    stages = st["stages"]
    assert list(stages) == list(STAGES)
    for name, d in stages.items():
        total = d["busy_s"] + d["wait_s"] + d["blocked_s"]
        assert total == pytest.approx(d["wall_s"], abs=ACCOUNT_ABS_S, rel=ACCOUNT_REL), name
        assert d["wall_s"] <= st["wall_seconds"] + 1e-6
        for share in ("busy_share", "wait_share", "blocked_share"):
            assert 0.0 <= d[share] <= 1.0, (name, share)
    # items in = items out along the pipeline: files, then chunks, then results, then parts
    assert stages["download"]["items_in"] == stages["download"]["items_out"] == s.sources == 3
    assert stages["read"]["items_in"] == s.files_read == 3
    assert stages["read"]["items_out"] == stages["transform"]["items_in"] == s.chunks
    assert stages["transform"]["items_out"] == stages["write"]["items_in"] == s.chunks
    assert stages["write"]["items_out"] == s.parts_written
    assert s.rows_in == 400 + 437 + 474
    assert stages["read"]["rows_out"] == 0  # CSV is parsed (and its rows counted) in the workers
    assert stages["transform"]["rows_out"] == s.rows_out
    assert stages["read"]["bytes_out"] == stages["transform"]["bytes_in"]
    assert stages["transform"]["bytes_out"] == stages["write"]["bytes_in"]
    # time measured inside the workers fits inside the transform's busy worker-slots
    worker_s = s.transform["worker_seconds"]
    assert worker_s / 2 <= stages["transform"]["busy_s"] + ACCOUNT_ABS_S
    # read's blocked time encloses every put the chunks queue saw blocked
    chunks_q = next(q for q in s.queues if q["name"] == "chunks")
    assert chunks_q["put_blocked_s"] / cfg.read.threads <= stages["read"]["blocked_s"] + ACCOUNT_ABS_S
    assert {q["name"] for q in st["queues"]} == {"files", "chunks", "results"}
    assert all(1 <= q["high_items"] <= q["max_items"] for q in st["queues"] if q["name"] != "files")
    assert st["peak_rss_bytes"] >= psutil.Process().memory_info().rss // 2
    assert st["cpu_seconds"] > 0 and 0 < st["cpu_util"]


async def test_a_slow_transform_is_named_the_bottleneck(tmp_path: Path, trips_dir: Path) -> None:
    # 14 chunks x 0.1 s on one worker: transform is busy nearly all the run, read is not
    cfg = load_job(_job(tmp_path, trips_dir, "thread", workers=1, sleep=0.1))
    s = await run_job(cfg, RunOptions())
    b = s.stats["bottleneck"]
    assert b["stage"] == "transform"
    assert b["busy_share"] > s.stats["stages"]["read"]["busy_share"]
    assert b["upstream_blocked_share"] == s.stats["stages"]["read"]["blocked_share"]
    text = format_summary(s)
    assert "bottleneck: transform (busy" in text and "upstream blocked" in text
    for name in STAGES:
        assert f"  {name}" in text


def test_cli_run_stores_stats_in_the_run_report(tmp_path: Path, trips_dir: Path) -> None:
    job = _job(tmp_path, trips_dir, "thread", workers=2, sleep=0.0)
    proc = subprocess.run(
        [sys.executable, "run.py", "--config", str(job), "--quiet"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bottleneck: " in proc.stderr and "peak RSS" in proc.stderr
    report = json.loads(next((tmp_path / "state" / "stats" / "reports").glob("run-*.json")).read_text())
    stats = report["summary"]["stats"]
    assert set(stats["stages"]) == set(STAGES)
    assert stats["bottleneck"]["stage"] in STAGES
    assert stats["peak_rss_bytes"] > 0


def test_bottleneck_rule_breaks_near_ties_by_the_blocked_queue_in_front() -> None:
    def st(busy: float, blocked: float) -> dict[str, float]:
        return {"busy_share": busy, "blocked_share": blocked}

    stages = {"download": st(0.0, 0.0), "read": st(0.93, 0.0), "transform": st(0.95, 0.0), "write": st(0.1, 0.0)}
    assert bottleneck(stages)["stage"] == "transform"  # read feeds transform but never blocked on it
    stages["read"] = st(0.93, 0.5)
    stages["download"] = st(0.1, 0.0)
    assert bottleneck(stages)["stage"] == "transform"
    stages["download"] = st(0.1, 0.6)  # read is as busy and download waits on read the most
    assert bottleneck(stages)["stage"] == "read"
    stages["transform"] = st(0.99, 0.0)
    stages["read"] = st(0.5, 0.5)
    assert bottleneck(stages)["stage"] == "transform"  # a clear lead wins whatever the queues


def test_chunks_held_back_by_the_memory_guard_make_the_budget_the_bottleneck() -> None:
    stages = {
        "download": {"busy_share": 0.1, "blocked_share": 0.0},
        "read": {"busy_share": 0.3, "blocked_share": 0.6},
        "transform": {"busy_share": 0.5, "blocked_share": 0.0},
        "write": {"busy_share": 0.1, "blocked_share": 0.0},
    }
    guard = {"budget": 1 << 30, "peak_rss_bytes": 1100 << 20, "paused_seconds": 4.5}
    b = bottleneck(stages, guard, run_wall=10.0)
    assert b["stage"] == "memory" and b["busiest"] == "transform"
    assert (b["held_back_s"], b["held_back_share"], b["budget_bytes"]) == (4.5, 0.45, 1 << 30)
    line = bottleneck_line(b)
    assert "memory budget" in line and "held back 4.5s = 45% of the run" in line and "budget 1,024 MiB" in line
    assert "resources.memory_limit" in line
    # held back for less than MEMORY_LIMIT_SHARE of the run: the busiest stage, as before
    short = {**guard, "paused_seconds": MEMORY_LIMIT_SHARE * 10.0 * 0.9}
    assert bottleneck(stages, short, run_wall=10.0)["stage"] == "transform"
    assert bottleneck(stages)["stage"] == "transform"


def test_tree_sampler_counts_child_processes(tmp_path: Path) -> None:
    hog = "import sys; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", hog], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        sampler = TreeSampler()
        sampler.sample()
        own = psutil.Process().memory_info().rss
        assert sampler.peak_rss >= own + (200 << 20) * 0.9
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("children_file", [True, False], ids=["proc-children", "psutil"])
def test_tree_sampler_counts_grandchildren_cpu(monkeypatch: pytest.MonkeyPatch, children_file: bool) -> None:
    """Both ways of walking the tree (Linux's children files, psutil's scan) find a
    grandchild started by a thread other than the main one and count its CPU seconds."""
    if children_file and not stats._PROC_CHILDREN:
        pytest.skip("no /proc/<pid>/task/<tid>/children on this kernel")
    monkeypatch.setattr(stats, "_PROC_CHILDREN", children_file)
    burn = (
        "import sys, time\n"
        "print('ready', flush=True); sys.stdin.readline(); t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "print('done', flush=True); sys.stdin.read()"
    )
    # The child starts the grandchild from a thread, so it hangs off that thread's children file.
    middle = (
        "import subprocess, sys, threading\n"
        "def start():\n"
        f"    global g; g = subprocess.Popen([sys.executable, '-c', {burn!r}], stdin=subprocess.PIPE)\n"
        "t = threading.Thread(target=start); t.start(); t.join()\n"
        "sys.stdin.readline(); g.stdin.write(b'go\\n'); g.stdin.flush(); sys.stdin.read(); g.kill(); g.wait()"
    )
    child = subprocess.Popen([sys.executable, "-c", middle], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"ready\n"  # the grandchild's, through the inherited stdout
        sampler = TreeSampler()
        sampler.sample()
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"done\n"
        sampler.sample()
        grandchild = psutil.Process(child.pid).children()[0]
        assert {os.getpid(), child.pid, grandchild.pid} <= {pid for pid, _ in sampler._last_cpu}
        assert sampler.cpu_seconds >= 0.25  # the grandchild's busy loop, counted since the first sample
    finally:
        child.kill()
        child.wait()

"""``run.py bench``'s runner helpers: --vary parsing and the grid, the cache a run starts
from, the memory limit it suggests, and the figures per point.

``Bench`` itself runs real ``run.py run`` processes and is tested end to end in test_bench.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from etl.core.errors import ConfigError
from etl.ops.bench_runs import PointResult, grid, limit_for, parse_vary, seed_cache, set_line, value_order
from etl.run.resources import PLAN_SHARE


def test_vary_parsing_and_grid() -> None:
    vary = parse_vary(["transform.workers=1,2,4", "read.chunk_rows=50000,200000"])
    assert len(grid(vary)) == 6
    assert grid(vary)[0] == {"transform.workers": "1", "read.chunk_rows": "50000"}
    with pytest.raises(ConfigError, match="--vary expects"):
        parse_vary(["transform.workers"])
    assert set_line(grid(vary)[0]) == "--set transform.workers=1 --set read.chunk_rows=50000"


def test_a_run_starts_from_the_caches_staged_files_and_validators_only(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "state" / "job"
    (cache / "staging").mkdir(parents=True)
    (cache / "staging" / "a.csv").write_text("id\n1\n")
    (cache / "staging" / "b.csv.part").write_text("half")  # a download cut short: not handed on
    (cache / "staging" / "b.csv.part.json").write_text("{}")
    (cache / "sources.json").write_text('{"etag": "x"}')
    (cache / "manifest.json").write_text("{}")  # the warm-up's own record: the run starts fresh
    job_state = tmp_path / "runs" / "r001" / "state" / "job"
    seed_cache(cache, job_state)
    assert sorted(p.name for p in (job_state / "staging").iterdir()) == ["a.csv"]
    assert os.path.samefile(job_state / "staging" / "a.csv", cache / "staging" / "a.csv")  # a hard link
    assert (job_state / "sources.json").read_text() == '{"etag": "x"}'
    assert not (job_state / "manifest.json").exists()


def test_a_suggested_memory_limit_fits_the_plan_and_is_above_the_budget() -> None:
    assert limit_for(int(1100 * 2**20)) == "1536MiB"  # 1100 MiB / 0.8 = 1375 MiB, in 256 MiB steps
    assert limit_for(int(0.8 * 2**30)) == "1GiB"  # exactly a whole GiB: said so
    assert limit_for(100 << 20, budget=2 << 30) == "2304MiB"  # never at or under the budget it outgrew
    assert (512 << 20) * PLAN_SHARE >= 400 << 20 and limit_for(400 << 20) == "512MiB"  # 400 / 0.8 = 500 MiB


def test_a_points_figures_are_medians_and_spread_of_its_runs() -> None:
    runs = [
        {"rows_per_s": v, "wall_s": 1e6 / v, "mib_per_s": 1.0, "peak_rss_mib": 100.0, "cpu_util": 0.5, "bottleneck": b}
        for v, b in ((900.0, "read"), (1000.0, "transform"), (1200.0, "transform"))
    ]
    result = PointResult({"transform.workers": "2"}, runs)
    assert result.throughput == 1000.0 and result.spread("rows_per_s") == (900.0, 1200.0)
    assert result.bottleneck == "transform" and result.fits and result.held_back == 0.0
    row = result.row()
    assert row["transform.workers"] == "2" and row["runs"] == 3 and row["fits_budget"] is True
    assert sorted(["10", "2", "auto", "1.5"], key=value_order) == ["1.5", "2", "10", "auto"]  # numbers by value

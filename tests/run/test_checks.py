"""The gate before publishing (etl.run.checks), over real runs: a failed check publishes
nothing and leaves the previous output byte-identical; a warning publishes; every result
reaches the report, the JSON log, the metrics file and ``validate``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

import etl
from etl.core.config import load_job
from etl.core.errors import ChecksFailed, ExitCode
from etl.core.records import ChunkChecks, ChunkResult, Source
from etl.run.checks import UNIQUE_PARTITIONS, Gate, describe_checks
from etl.transform.checks import unique_keys

ROOT = Path(__file__).resolve().parents[2]


def write_csv(path: Path, ids: range | list[int], fare: str = "{i}.5", payment: str = "card") -> None:
    lines = ["id,fare,payment"] + [f"{i},{fare.format(i=i)},{payment}" for i in ids]
    path.write_text("\n".join(lines) + "\n")


def job(tmp: Path, checks: str = "", *, executor: str = "process", mode: str = "overwrite", steps: str = "") -> Path:
    path = tmp / "job.toml"
    path.write_text(
        f"""
[job]
name = "gate"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[read]
chunk_rows = 40

[transform]
executor = "{executor}"
workers = 2
steps = [{{op = "cast", columns = {{id = "int64", fare = "float64"}}}}, {steps}]

[output]
path = "out"
mode = "{mode}"

[checks]
{checks}
"""
    )
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_csv(d / "a.csv", range(0, 100))
    write_csv(d / "b.csv", range(100, 200))
    return d


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (and the folder's siblings: no temp folder left behind)."""
    files = {
        str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }
    return files | {
        "siblings": ",".join(sorted(p.name for p in root.parent.iterdir() if p.name.startswith((".out", "out"))))
    }


def run(path: Path, *overrides: str, **kw: Any) -> etl.RunResult:
    return etl.run_job(path, overrides=list(overrides), **kw)


def report(result: etl.RunResult) -> dict[str, Any]:
    assert result.report is not None
    return json.loads(result.report.read_text())


def by_name(checks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in checks["results"]}


# ------------------------------------------------------------------ real runs


Change = Callable[[Path], str]
"""Changes the input (the data folder) for the second run; returns extra steps, or ""."""


def rows(name: str, ids: range | list[int], **kw: str) -> Change:
    def change(d: Path) -> str:
        write_csv(d / name, ids, **kw)
        return ""

    return change


def shrink(d: Path) -> str:
    (d / "b.csv").unlink()
    write_csv(d / "a.csv", range(0, 80))
    return ""


FAILING: list[tuple[str, str, int, str, Change]] = [
    ("columns.fare = {min = 0}", "min(fare)", 10, "a.csv", rows("a.csv", [*range(0, 90), *range(-10, 0)])),
    (
        "columns.payment = {accepted_values = ['card']}",
        "accepted_values(payment)",
        100,
        "b.csv",
        rows("b.csv", range(100, 200), payment="cash"),
    ),
    ("columns.fare = {not_null = true}", "not_null(fare)", 100, "b.csv", rows("b.csv", range(100, 200), fare="")),
    ("columns.fare = {max = 1000}", "max(fare)", 100, "b.csv", rows("b.csv", range(100, 200), fare="5000")),
    (
        'expect = [{expr = "fare < id + 1", name = "fare_below_id"}]',
        "fare_below_id",
        100,
        "b.csv",
        rows("b.csv", range(100, 200), fare="{i}000"),
    ),
    ("columns.id = {unique = true}", "unique(id)", 50, "b.csv", rows("b.csv", [*range(100, 150), *range(100, 150)])),
    ("min_rows = 150", "min_rows", 1, "", rows("b.csv", range(100, 120))),
    ("max_rows = 250", "max_rows", 1, "", rows("b.csv", range(100, 400))),
    ("max_drop = '50%'", "max_drop", 1, "", shrink),
    (
        'schema = {columns = {id = "int64", fare = "float64", payment = "string"}}',
        "schema",
        1,
        "",
        lambda d: '{op = "derive", columns = {fare = "str(fare)"}}',
    ),
]


@pytest.mark.parametrize(("checks", "name", "failed", "file", "change"), FAILING, ids=[f[1] for f in FAILING])
def test_each_check_passes_then_fails_and_the_previous_output_stays_byte_identical(
    tmp_path: Path, data: Path, checks: str, name: str, failed: int, file: str, change: Change
) -> None:
    path = job(tmp_path, checks)
    first = run(path)
    assert first.exit_code == ExitCode.OK, first.error
    assert first.summary is not None and by_name(first.summary.checks)[name]["status"] == "passed"
    before = tree(tmp_path / "out")

    steps = change(data)
    second = run(job(tmp_path, checks, steps=steps))
    assert second.exit_code == ExitCode.CHECKS_FAILED == 4, second.error
    assert second.status == "failed" and second.summary is None
    assert tree(tmp_path / "out") == before  # nothing published, nothing left beside it
    found = by_name(report(second)["checks"])[name]
    assert found["status"] == "failed" and found["warn_only"] is False
    assert (found.get("failed") or 1) == failed
    if file:
        assert len(found["examples"]) == min(failed, 5) and found["examples"][0]["file"] == file
        assert "line" in found["examples"][0]
    assert name in str(second.error) and "nothing was published" in str(second.error)
    spill = tmp_path / "state" / "gate" / "checks"
    assert not spill.exists() or not any(spill.iterdir())


def test_a_warning_is_reported_and_the_run_still_publishes(tmp_path: Path, data: Path) -> None:
    write_csv(data / "b.csv", range(100, 200), fare="-{i}")
    path = job(
        tmp_path, 'columns.fare = {min = 0, not_null = true, warn = ["min"]}\nmin_rows = 1000\nwarn = ["min_rows"]'
    )
    metrics = tmp_path / "etl.prom"
    result = run(path, metrics_file=metrics)
    assert result.exit_code == ExitCode.OK, result.error
    assert sum(1 for _ in (tmp_path / "out").rglob("*.parquet")) > 0
    checks = by_name(report(result)["checks"])
    assert checks["min(fare)"]["status"] == "warned" and checks["min(fare)"]["failed"] == 100
    assert checks["min_rows"]["status"] == "warned" and checks["not_null(fare)"]["status"] == "passed"
    samples = {
        s.labels["check"]: (s.value, s.labels["severity"])
        for f in text_string_to_metric_families(metrics.read_text())
        if f.name == "etl_check_failures"
        for s in f.samples
    }
    assert samples["min(fare)"] == (100, "warn") and samples["not_null(fare)"] == (0, "fail")
    assert samples["min_rows"] == (1, "warn")


def test_unique_catches_duplicates_in_different_files_and_chunks(tmp_path: Path, data: Path) -> None:
    """Three files, chunks of 40 rows: each duplicate sits in another file and another chunk."""
    write_csv(data / "c.csv", [5, 150, 199, 1000, 1001])  # 5 is in a.csv's chunk 0, 150 and 199 in b.csv
    path = job(tmp_path, "columns.id = {unique = true}")
    result = run(path)
    assert result.exit_code == ExitCode.CHECKS_FAILED
    found = by_name(report(result)["checks"])["unique(id)"]
    assert found["failed"] == 3
    assert found["examples"] == [
        {"file": "c.csv", "line": 2, "duplicate_of": {"file": "a.csv", "line": 7}},
        {"file": "c.csv", "line": 3, "duplicate_of": {"file": "b.csv", "line": 52}},
        {"file": "c.csv", "line": 4, "duplicate_of": {"file": "b.csv", "line": 101}},
    ]
    assert not (tmp_path / "out").exists()


def test_an_empty_result_over_a_good_output_fails_without_configuration(tmp_path: Path, data: Path) -> None:
    """The issue's story: a filter that keeps nothing, in overwrite mode, over a good output."""
    path = job(tmp_path)
    assert run(path).exit_code == ExitCode.OK
    before = tree(tmp_path / "out")
    empty = job(tmp_path, steps='{op = "filter", expr = "isnull(fare)"}')
    result = run(empty)
    assert result.exit_code == ExitCode.CHECKS_FAILED
    assert tree(tmp_path / "out") == before
    found = by_name(report(result)["checks"])["not_empty"]
    assert "200 rows read, 0 to publish over an output of 200 rows" in found["detail"]
    allowed = run(empty, "checks.allow_empty=true")
    assert allowed.exit_code == ExitCode.OK and not list((tmp_path / "out").rglob("*.parquet"))


def test_max_rejected_counts_the_share_of_rows_rejected(tmp_path: Path, data: Path) -> None:
    write_csv(data / "b.csv", range(100, 200), fare="oops")
    path = job(tmp_path, "max_rejected = '10%'")
    result = run(path, "transform.on_error=skip")
    assert result.exit_code == ExitCode.CHECKS_FAILED
    found = by_name(report(result)["checks"])["max_rejected"]
    assert found["failed"] == 100 and found["value"] == 0.5
    assert run(path, "transform.on_error=skip", "checks.max_rejected=0.6").exit_code == ExitCode.REJECTED_ROWS


@pytest.mark.parametrize(
    ("executor", "mode"),
    [("process", "append"), ("dask", "overwrite"), ("dask", "append"), ("serial", "append")],
)
def test_failed_checks_publish_nothing_under_every_executor_and_mode(
    tmp_path: Path, data: Path, executor: str, mode: str
) -> None:
    if executor == "dask":
        pytest.importorskip("distributed")
    checks = "columns.id = {unique = true}\ncolumns.fare = {min = 0}"
    path = job(tmp_path, checks, executor=executor, mode=mode)
    assert run(path).exit_code == ExitCode.OK
    before = tree(tmp_path / "out")
    write_csv(data / "c.csv", range(300, 340))  # new files: one id in both, 50 negative fares
    write_csv(data / "d.csv", [*range(400, 449), 305], fare="-{i}")
    for _ in range(2):  # and again: the failed run left nothing the next one trips over
        result = run(path)
        assert result.exit_code == ExitCode.CHECKS_FAILED, result.error
        assert tree(tmp_path / "out") == before
        checks_found = by_name(report(result)["checks"])
        assert checks_found["unique(id)"]["failed"] == 1 and checks_found["min(fare)"]["failed"] == 50
    (data / "c.csv").unlink()
    (data / "d.csv").unlink()
    write_csv(data / "c.csv", range(300, 340))
    fixed = run(path)
    assert fixed.exit_code == ExitCode.OK and fixed.summary is not None
    assert fixed.summary.rows_out == 40  # only c.csv is new
    assert fixed.summary.checks["published_rows"] == (40 if mode == "append" else 240)


def test_json_log_carries_each_check_and_the_cli_exits_4_without_a_traceback(tmp_path: Path, data: Path) -> None:
    write_csv(data / "b.csv", range(100, 200), payment="cash")
    path = job(tmp_path, "columns.payment = {accepted_values = ['card']}")
    log_file, metrics = tmp_path / "run.log", tmp_path / "etl.prom"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "--config",
            str(path),
            "--quiet",
            "--log-format",
            "json",
            "--log-file",
            str(log_file),
            "--metrics-file",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr + log_file.read_text()
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    failed = [e for e in lines if e.get("check")]
    assert [e["check"]["name"] for e in failed] == ["accepted_values(payment)"]
    assert failed[0]["level"] == "ERROR" and failed[0]["stage"] == "checks"
    assert failed[0]["check"]["examples"][0] == {"file": "b.csv", "line": 2, "values": {"payment": "cash"}}
    assert any("1 check(s) failed" in e["message"] for e in lines)
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    assert families["etl_run_exit_code"].samples[0].value == 4
    failures = {s.labels["check"]: s.value for s in families["etl_check_failures"].samples}
    assert failures == {"accepted_values(payment)": 100, "not_empty": 0}


def test_validate_prints_every_check_it_will_run(tmp_path: Path, data: Path) -> None:
    path = job(
        tmp_path,
        "columns.id = {unique = true, not_null = true}\nmax_drop = '50%'\n"
        'expect = [{expr = "fare >= 0", warn = true}]\nschema = {columns = {id = "int64", fare = "float64"}}',
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "checks before publishing (6):" in proc.stdout
    for line in (
        "not_null(id): no null values",
        "unique(id): no value twice",
        "expect[0] (warn): true on every row: fare >= 0",
        "schema: id int64, fare double; no other columns",
        "max_drop: published rows fall by at most 50%",
        "not_empty: a run that reads rows publishes some",
    ):
        assert line in proc.stdout


def test_a_bad_check_fails_validation_with_exit_2_naming_the_key(tmp_path: Path, data: Path) -> None:
    for checks, key in [
        ('expect = [{expr = "fare != None"}]', "checks.expect[0].expr"),
        ("max_drop = 'half'", "checks.max_drop"),
        ("columns.id = {unqiue = true}", "checks.columns.id.unqiue"),
    ]:
        result = run(job(tmp_path, checks))
        assert result.exit_code == ExitCode.BAD_CONFIG and result.status == "invalid", checks
        assert key in str(result.error)


# ------------------------------------------------------------------ the gate itself


def test_unique_spills_hashed_partitions_and_holds_one_at_a_time(tmp_path: Path) -> None:
    """Many chunks of keys: spilled to at most UNIQUE_PARTITIONS files, removed at the end."""
    (tmp_path / "job.toml").write_text(
        '[job]\nname = "g"\nstate_dir = "state"\n[sources]\nurls = []\n[output]\npath = "out"\n'
        "[checks]\ncolumns.id = {unique = true}\n"
    )
    cfg = load_job(tmp_path / "job.toml")
    sources = [Source(i, f"s{i}.csv", f"s{i}.csv", "csv") for i in range(4)]
    gate = Gate(cfg, "run1", sources)
    rows = 200_000
    for i, start in enumerate(range(0, 4 * rows, rows)):
        ids = pd.Series(np.arange(start, start + rows) % 700_001, index=pd.RangeIndex(2, rows + 2))
        gate.add(ChunkResult(i, 0, rows, rows, checks=ChunkChecks(f"s{i}.csv", "line", keys={"id": unique_keys(ids)})))
    spilled = list(gate.folder.iterdir())
    assert 1 < len(spilled) <= UNIQUE_PARTITIONS
    assert max(p.stat().st_size for p in spilled) < 2 * (4 * rows * 32) / UNIQUE_PARTITIONS  # evenly spread
    with pytest.raises(ChecksFailed) as info:
        gate.finish(rows_in=4 * rows, rows_rejected=0, published_rows=4 * rows, previous_rows=0)
    found = by_name({"results": info.value.checks})["unique(id)"]
    assert found["failed"] == 4 * rows - 700_001
    assert found["examples"][0] == {
        "file": "s3.csv",
        "line": 2 + 700_001 - 3 * rows,
        "duplicate_of": {"file": "s0.csv", "line": 2},
    }
    assert not gate.folder.exists()


def test_describe_lists_the_guard_even_without_checks(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text('[job]\nname = "g"\n[sources]\nurls = []\n[output]\npath = "out"\n')
    assert describe_checks(load_job(tmp_path / "job.toml").checks) == [
        "not_empty: a run that reads rows publishes some over a non-empty output"
    ]


def test_a_spill_that_cannot_be_written_fails_the_run_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        '[job]\nname = "g"\nstate_dir = "state"\n[sources]\nurls = []\n[output]\npath = "out"\n'
        "[checks]\ncolumns.id = {unique = true}\n"
    )
    gate = Gate(load_job(tmp_path / "job.toml"), "run1", [Source(0, "s.csv", "s.csv", "csv")])
    gate.folder.parent.parent.mkdir(parents=True, exist_ok=True)
    gate.folder.parent.write_text("in the way")  # stands in for a full or read-only disk
    ids = pd.Series([1, 2, 3])
    with pytest.raises(etl.ETLError, match="cannot spill unique keys") as info:
        gate.add(ChunkResult(0, 0, 3, 3, checks=ChunkChecks("s.csv", "line", keys={"id": unique_keys(ids)})))
    assert info.value.item == str(gate.folder) and info.value.stage == "checks"


def test_max_drop_in_append_mode_compares_with_the_last_successful_append(tmp_path: Path, data: Path) -> None:
    path = job(tmp_path, "max_drop = '50%'", mode="append")
    assert run(path).exit_code == ExitCode.OK  # appends 200 rows
    before = tree(tmp_path / "out")
    write_csv(data / "c.csv", range(300, 340))  # 40 rows: a fall of 80 % against 200
    result = run(path)
    assert result.exit_code == ExitCode.CHECKS_FAILED
    assert tree(tmp_path / "out") == before
    found = by_name(report(result)["checks"])["max_drop"]
    assert found["value"] == 40 and found["limit"] == 200 and "-80.00%" in found["detail"]
    write_csv(data / "c.csv", range(300, 420))  # 120 rows: a fall of 40 %
    assert run(path).exit_code == ExitCode.OK
    import pyarrow.dataset as ds

    appended = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").count_rows()
    assert appended == 200 + 120  # c.csv's 120 rows appended beside the first run's 200

"""``run.py init``: a job file from the head of a real source (local files in each format,
a file served over HTTP), which passes ``validate`` as written and runs."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from etl.core.errors import ConfigError
from etl.ops.datagen import generate
from etl.ops.init import HEAD_BYTES, init_job, read_head
from tests.http_server import serve_folder_in_thread

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = str(ROOT / "run.py")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, RUN_PY, *args], check=False, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def steps_of(job: Path) -> list[dict]:
    return tomllib.loads(job.read_text())["transform"].get("steps", [])


def test_init_from_a_gzipped_csv_suggests_types_validates_and_runs(tmp_path: Path) -> None:
    generate(tmp_path / "data", rows=60_000, files=1, seed=3, fmt="csv.gz")
    (path,) = sorted((tmp_path / "data").glob("trips-*.csv.gz"))
    job = tmp_path / "jobs" / "trips.toml"
    made = cli("init", str(job), "--source", str(path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    text = job.read_text()
    assert '"../data/' in text  # the source relative to the job file's folder
    steps = steps_of(job)
    casts = steps[0]["columns"]
    assert steps[0]["op"] == "cast" and casts["trip_id"] == "Int64" and casts["fare_amount"] == "float64"
    assert "notes" not in casts and "payment_type" not in casts  # text stays text
    assert steps[1] == {"op": "parse_datetime", "columns": ["pickup_at", "dropoff_at"], "format": "%Y-%m-%d %H:%M:%S"}
    assert "#   payment_type" in text and "consider category" in text  # every column listed, commented
    assert cli("validate", "--config", str(job), cwd=tmp_path).returncode == 0
    run = cli("--config", str(job), "--quiet", cwd=tmp_path)
    assert run.returncode in (0, 3), run.stderr
    table = ds.dataset(tmp_path / "jobs" / "out" / "trips", format="parquet").to_table()
    assert table.num_rows > 0
    assert pa.types.is_timestamp(table.schema.field("pickup_at").type)
    assert table.schema.field("fare_amount").type == pa.float64()
    assert (tmp_path / "jobs" / ".etl-state" / "trips").is_dir()  # state path filled in


def test_init_over_http_reads_only_the_head(tmp_path: Path) -> None:
    generate(tmp_path / "data", rows=200_000, files=1, seed=1, fmt="csv")
    (src,) = sorted((tmp_path / "data").glob("trips-*.csv"))
    assert src.stat().st_size > 4 * HEAD_BYTES
    base, stop = serve_folder_in_thread(tmp_path / "data")
    try:
        url = f"{base}/{src.name}"
        job = tmp_path / "web.toml"
        init_job(job, url)
        assert tomllib.loads(job.read_text())["sources"]["urls"] == [url]
        made = cli("validate", "--config", str(job), "--check-sources", cwd=tmp_path)
    finally:
        stop()
    assert made.returncode == 0, made.stdout + made.stderr
    assert steps_of(job)[0]["columns"]["trip_distance"] == "float64"


def test_init_from_json_lines_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"id": i, "at": f"2026-01-0{1 + i % 9}T10:00:0{i % 10}Z", "day": "2026-03-04", "v": i / 3, "tag": None}
        for i in range(100)
    ]
    jl = tmp_path / "events.jsonl.gz"
    jl.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    job = tmp_path / "events.toml"
    init_job(job, str(jl))
    steps = steps_of(job)
    assert {"op": "parse_datetime", "columns": ["at"], "utc": True} in steps
    assert {"op": "cast", "columns": {"day": "date"}, "format": "%Y-%m-%d"} in steps
    assert not any(s["op"] == "cast" and "id" in s["columns"] for s in steps)  # JSON numbers are typed
    assert cli("--config", str(job), "--quiet", cwd=tmp_path).returncode == 0

    pq.write_table(pa.table({"id": [1, 2], "name": ["a", "b"]}), tmp_path / "t.parquet")
    init_job(tmp_path / "p.toml", str(tmp_path / "t.parquet"))
    assert steps_of(tmp_path / "p.toml") == []
    assert "Parquet int64" in (tmp_path / "p.toml").read_text()
    assert cli("validate", "--config", str(tmp_path / "p.toml"), cwd=tmp_path).returncode == 0


def test_semicolons_odd_names_and_mixed_values(tmp_path: Path) -> None:
    src = tmp_path / "odd.csv"
    lines = ["trip id;fare (usd);when;flag;mixed"]
    lines += [f"{i};{i}.5;0{1 + i % 9}/02/2026;{'yes' if i % 2 else 'no'};{i if i % 7 else 'n/a'}" for i in range(60)]
    src.write_text("\n".join(lines) + "\n")
    job = tmp_path / "odd.toml"
    init_job(job, str(src))
    data = tomllib.loads(job.read_text())
    assert data["read"]["delimiter"] == ";"
    casts = next(s for s in data["transform"]["steps"] if s["op"] == "cast" and "trip id" in s["columns"])
    assert casts["columns"] == {"trip id": "Int64", "fare (usd)": "float64", "flag": "boolean"}
    assert {"op": "cast", "columns": {"when": "date"}, "format": "%d/%m/%Y"} in data["transform"]["steps"]
    run = cli("--config", str(job), "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr


def test_an_existing_job_file_or_an_unreadable_source_is_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    src.write_text("x,y\n1,2\n")
    job = tmp_path / "a.toml"
    job.write_text("# mine\n")
    proc = cli("init", str(job), "--source", str(src), cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr and job.read_text() == "# mine\n"
    assert cli("init", str(job), "--source", str(src), "--force", cwd=tmp_path).returncode == 0
    missing = cli("init", str(tmp_path / "b.toml"), "--source", str(tmp_path / "nope.csv"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.csv" in missing.stderr and "Traceback" not in missing.stderr
    with pytest.raises(ConfigError, match="cannot read http://127.0.0.1:9/x.csv"):
        read_head("http://127.0.0.1:9/x.csv")

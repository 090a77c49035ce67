"""Sources and outputs on S3, against moto's real S3 server on 127.0.0.1 (not a client mock)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from etl.core.config import load_job  # noqa: E402
from etl.core.errors import ConfigError, StepError  # noqa: E402
from etl.core.objstore import filesystem  # noqa: E402
from etl.run.pipeline import RunOptions, run_job  # noqa: E402
from etl.write.objects import read_manifest  # noqa: E402
from tests.conftest import JobWriter, write_trips_csv  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket; credentials and endpoint only in the environment, as users set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    name = "b-" + request.node.name.lower().replace("_", "-")[:50]
    fs, _ = filesystem(f"s3://{name}", key="test")
    fs.mkdir(name)
    return name


def upload_trips(tmp_path: Path, bucket: str) -> list[Path]:
    fs, _ = filesystem(f"s3://{bucket}", key="test")
    local = []
    for k in range(3):
        path = tmp_path / f"trips-{k}.csv"
        write_trips_csv(path, rows=300 + 11 * k, seed=k, start_id=10_000 * k)
        fs.put_file(str(path), f"{bucket}/in/2026/trips-{k}.csv")
        local.append(path)
    fs.pipe_file(f"{bucket}/in/2026/readme.txt", b"not a source")
    return local


def job(sources: str, out: str, extra_steps: str = "", mode: str = "overwrite") -> str:
    return f"""
[job]
name = "s3"
state_dir = "state"
[sources]
urls = {sources}
[read]
chunk_rows = 100
[transform]
executor = "serial"
steps = [
  {{op = "cast", columns = {{fare = "float64", zone = "int64"}}}},
  {{op = "filter", expr = "fare > 0"}},
  {{op = "parse_datetime", columns = ["pickup_at"], format = "%Y-%m-%d %H:%M:%S"}},
  {{op = "derive", columns = {{month = 'strftime(pickup_at, "%Y-%m")'}}}},
  {{op = "select", columns = ["trip_id", "fare", "zone", "month"]}},
  {extra_steps}
]
[output]
path = "{out}"
partition_by = ["month"]
mode = "{mode}"
"""


def run(path: Path, run_id: str) -> object:
    # full_refresh: every run processes every source (see the report on incremental runs)
    return asyncio.run(run_job(load_job(path), RunOptions(run_id=run_id, full_refresh=True)))


def read_published(url: str) -> pd.DataFrame:
    """What a reader that follows ``_latest`` sees."""
    fs, root = filesystem(url, key="test")
    manifest = read_manifest(url)
    assert manifest is not None
    files = [f"{root}/{f['path']}" for f in manifest["files"]]
    table = ds.dataset(files, filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=root).to_table()
    return table.to_pandas().sort_values("trip_id", ignore_index=True)


def read_local(out: Path) -> pd.DataFrame:
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    return table.to_pandas().sort_values("trip_id", ignore_index=True)


def test_sources_from_a_bucket_and_partitioned_output_to_a_bucket(
    tmp_path: Path, bucket: str, write_job: JobWriter
) -> None:
    local = upload_trips(tmp_path, bucket)
    url = f"s3://{bucket}/out/trips"
    summary = run(write_job(job(f'["s3://{bucket}/in/2026/trips-*.csv"]', url)), "r1")
    assert summary.sources == 3
    got = read_published(url)

    reference = write_job(job(json.dumps([str(p) for p in local]), str(tmp_path / "ref")), "ref.toml")
    run(reference, "ref")
    want = read_local(tmp_path / "ref")
    pd.testing.assert_frame_equal(got, want, check_dtype=False, check_categorical=False)
    assert len(got) > 0 and set(got["month"]) == {"2026-01", "2026-02", "2026-03"}

    fs, root = filesystem(url, key="test")
    manifest = read_manifest(url)
    assert manifest["run_id"] == "r1" and manifest["partition_by"] == ["month"]
    assert sum(f["rows"] for f in manifest["files"]) == len(got)
    assert all(f["path"].startswith("_runs/r1/month=") for f in manifest["files"])
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/{n}" for n in ("_latest", "_manifests", "_runs")]


def test_a_prefix_lists_every_object_under_it(tmp_path: Path, bucket: str, write_job: JobWriter) -> None:
    upload_trips(tmp_path, bucket)
    with pytest.raises(ConfigError) as e:  # the prefix holds readme.txt too: not a known format
        run(write_job(job(f'["s3://{bucket}/in/2026/"]', str(tmp_path / "o"))), "p1")
    assert "readme.txt" in str(e.value)
    one = f"s3://{bucket}/in/2026/trips-1.csv"
    run(write_job(job(f'["{one}"]', str(tmp_path / "o"))), "p2")
    assert len(read_local(tmp_path / "o")) > 0


def test_missing_objects_are_config_errors_naming_the_key(tmp_path: Path, bucket: str, write_job: JobWriter) -> None:
    for url in (f"s3://{bucket}/nothing-*.csv", f"s3://{bucket}/absent.csv"):
        with pytest.raises(ConfigError) as e:
            run(write_job(job(f'["{url}"]', str(tmp_path / "o"))), "m1")
        assert e.value.item == "sources.urls[0]" and url in str(e.value)


def test_a_failing_run_leaves_no_manifest_and_the_previous_run_current(
    tmp_path: Path, bucket: str, write_job: JobWriter
) -> None:
    upload_trips(tmp_path, bucket)
    url = f"s3://{bucket}/out"
    sources = f'["s3://{bucket}/in/2026/trips-*.csv"]'
    run(write_job(job(sources, url)), "good")
    before = read_published(url)
    # a fourth source, last in order, with a fare no cast accepts: the others' parts are
    # already written when its chunk fails the run
    bad = tmp_path / "trips-3.csv"
    write_trips_csv(bad, rows=50, seed=3, start_id=30_000)
    with bad.open("a") as f:
        f.write("39999,2026-01-01 10:00:00,2026-01-01 11:00:00,1,1.0,n/a,0,1,card,\n")
    fs, root = filesystem(url, key="test")
    fs.put_file(str(bad), f"{bucket}/in/2026/trips-3.csv")
    with pytest.raises(StepError) as e:
        run(write_job(job(sources, url)), "bad")
    assert "trips-3.csv" in str(e.value)
    fs.invalidate_cache()
    assert read_manifest(url)["run_id"] == "good"
    assert not fs.exists(f"{root}/_manifests/bad.json")
    assert not fs.exists(f"{root}/_runs/bad")
    pd.testing.assert_frame_equal(read_published(url), before)


def test_append_lists_every_run_and_overwrite_drops_superseded_runs(
    tmp_path: Path, bucket: str, write_job: JobWriter
) -> None:
    upload_trips(tmp_path, bucket)
    sources = f'["s3://{bucket}/in/2026/trips-0.csv"]'
    url = f"s3://{bucket}/appended"
    run(write_job(job(sources, url, mode="append")), "a1")
    once = read_published(url)
    run(write_job(job(sources, url, mode="append")), "a2")
    twice = read_published(url)
    assert len(twice) == 2 * len(once)

    url = f"s3://{bucket}/replaced"
    for run_id in ("o1", "o2", "o3"):
        run(write_job(job(sources, url)), run_id)
    fs, root = filesystem(url, key="test")
    fs.invalidate_cache()
    assert read_manifest(url)["run_id"] == "o3"
    pd.testing.assert_frame_equal(read_published(url), once)
    # the newest run and the one before it stay (a reader may still be on it); o1 is gone
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_runs", detail=False)) == ["o2", "o3"]

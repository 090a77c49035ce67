"""Sources on S3 (and a partitioned output to a bucket), against moto's real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from etl.core.errors import ConfigError
from etl.core.objstore import filesystem
from etl.write.objects import read_manifest
from tests.conftest import JobWriter
from tests.s3 import bucket, job, read_local, read_published, run, s3_endpoint, upload_trips

__all__ = ["bucket", "s3_endpoint"]  # fixtures, used by name


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


def test_an_object_tells_its_size_before_its_bytes_are_staged(tmp_path: Path, bucket: str) -> None:
    """``stage_object(sized=...)`` hears the object's size once it is open: the progress
    totals (``etl.run.pipeline``) know it before the download ends."""
    import asyncio

    from etl.core.records import Source
    from etl.download.objects import stage_object

    local = upload_trips(tmp_path, bucket)[1]
    staging = tmp_path / "staging"
    staging.mkdir()
    told: list[tuple[int, bool]] = []
    src = Source(0, f"s3://{bucket}/in/2026/trips-1.csv", "trips-1.csv", "csv")
    staged = asyncio.run(
        stage_object(src, staging, 4096, sized=lambda n: told.append((n, (staging / "trips-1.csv").exists())))
    )
    assert told == [(local.stat().st_size, False)]  # told once, before the staged file existed
    assert staged.size == local.stat().st_size

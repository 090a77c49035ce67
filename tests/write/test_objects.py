"""Outputs on S3 (etl/write/objects.py): the manifest is the commit, against moto's real S3 server."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from etl.core.errors import StepError
from etl.core.objstore import filesystem
from etl.write.objects import read_manifest
from tests.conftest import JobWriter, write_trips_csv
from tests.s3 import bucket, job, read_published, run, s3_endpoint, upload_trips

__all__ = ["bucket", "s3_endpoint"]  # fixtures, used by name


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

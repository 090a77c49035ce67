"""A real S3 server for tests: moto's, on 127.0.0.1 (not a client mock), and helpers around it.

Import the fixtures into a test module (``from tests.s3 import bucket, s3_endpoint``); the
module skips when s3fs or moto is not installed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from etl.core.config import load_job  # noqa: E402
from etl.core.objstore import filesystem  # noqa: E402
from etl.run.pipeline import RunOptions, RunSummary, run_job  # noqa: E402
from etl.write.objects import read_manifest  # noqa: E402
from tests.conftest import write_trips_csv  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
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


def run(path: Path, run_id: str) -> RunSummary:
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

"""Which URLs are object-store URLs, and the fsspec filesystem behind one (etl/core/objstore.py)."""

from __future__ import annotations

import pytest

from etl.core.errors import ConfigError
from etl.core.objstore import filesystem, is_object_url, storage_options, store_errors, url_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/key.csv", True),
        ("S3://bucket/key.csv", True),
        ("gs://bucket/prefix/", True),
        ("memory://b/x", True),
        ("http://host/f.csv", False),
        ("HTTPS://host/f.csv", False),
        ("file:///tmp/f.csv", False),
        ("/tmp/f.csv", False),
        ("data/trips-*.csv", False),
    ],
)
def test_object_urls_are_scheme_urls_other_than_http_and_file(text: str, expected: bool) -> None:
    assert is_object_url(text) is expected


def test_s3_endpoint_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage_options("s3") == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert storage_options("s3") == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")  # the S3-specific one wins
    assert storage_options("s3a") == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9001"}}
    assert storage_options("gs") == {}


def test_a_memory_filesystem_round_trips_and_names_its_urls() -> None:
    fs, path = filesystem("memory://objstore-test/dir/a.txt", key="sources.urls[0]")
    fs.pipe_file(path, b"hello")
    assert fs.cat_file(path) == b"hello"
    assert url_of(fs, path) == "memory:///objstore-test/dir/a.txt"
    assert OSError in store_errors()


def test_an_unknown_scheme_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        filesystem("nosuchscheme://bucket/x", key="output.path", file="job.toml")
    assert "output.path" in str(e.value) and "nosuchscheme" in str(e.value)

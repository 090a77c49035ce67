"""The ``.part`` files a remote download resumes from: real files in tmp_path."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from etl.download.partial import PartFile

IDENT = "https://h.example/a.csv"


def part_with(tmp_path: Path, body: bytes, meta: dict[str, str | None] | None) -> PartFile:
    partial = PartFile(tmp_path, "a.csv", IDENT)
    with partial.open(0) as f:
        f.write(body)
    if meta is not None:
        partial.meta.write_text(json.dumps(meta), encoding="utf-8")
    return partial


@pytest.mark.parametrize(
    ("meta", "validator"),
    [
        ({"url": IDENT, "etag": '"v1"', "last_modified": None}, '"v1"'),
        (
            {"url": IDENT, "etag": 'W/"weak"', "last_modified": "Thu, 01 Jan 2026 12:00:00 GMT"},
            "Thu, 01 Jan 2026 12:00:00 GMT",
        ),
    ],
    ids=["strong-etag", "weak-etag-falls-back-to-last-modified"],
)
def test_a_part_with_a_validator_for_the_same_source_is_resumed(
    tmp_path: Path, meta: dict[str, str | None], validator: str
) -> None:
    partial = part_with(tmp_path, b"x" * 100, meta)
    assert partial.resume_point() == (100, validator)
    assert partial.part.exists() and partial.meta.exists()
    with partial.open(100) as f:  # appends after the bytes kept
        f.write(b"y" * 5)
    assert partial.part.read_bytes() == b"x" * 100 + b"y" * 5


@pytest.mark.parametrize(
    "meta",
    [
        None,  # no .part.json: nothing says what the bytes are
        {"url": "https://other.example/a.csv", "etag": '"v1"', "last_modified": None},
        {"url": IDENT, "etag": 'W/"weak"', "last_modified": None},  # a weak ETag cannot make If-Range
        {"url": IDENT, "etag": None, "last_modified": None},
    ],
    ids=["no-meta", "other-source", "weak-etag-only", "no-validator"],
)
def test_a_part_that_cannot_be_resumed_is_discarded(tmp_path: Path, meta: dict[str, str | None] | None) -> None:
    partial = part_with(tmp_path, b"x" * 100, meta)
    assert partial.resume_point() == (0, None)
    assert not partial.part.exists() and not partial.meta.exists()


def test_a_broken_meta_file_reads_as_empty(tmp_path: Path) -> None:
    partial = PartFile(tmp_path, "a.csv", IDENT)
    partial.meta.write_text("{not json", encoding="utf-8")
    assert partial.read_meta() == {}


def test_write_meta_keeps_the_validators_and_publish_renames_the_part(tmp_path: Path) -> None:
    partial = part_with(tmp_path, b"id\n1\n", None)
    partial.write_meta({"ETag": '"e"', "Last-Modified": "Thu, 01 Jan 2026 12:00:00 GMT"})
    assert partial.read_meta() == {"url": IDENT, "etag": '"e"', "last_modified": "Thu, 01 Jan 2026 12:00:00 GMT"}
    assert stat.S_IMODE(partial.part.stat().st_mode) == 0o600
    assert stat.S_IMODE(partial.meta.stat().st_mode) == 0o600
    partial.publish()
    assert (tmp_path / "a.csv").read_bytes() == b"id\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]

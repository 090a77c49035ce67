"""Records past read.max_record_bytes in JSON Lines and reader-parsed CSV: set aside under
on_error = skip | quarantine (a dead letter naming file and line, the rest read on), a
failure naming file and line under fail; memory bounded while skipping."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from etl.core.chunks import decode_chunk
from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.parts import encode_rejects
from etl.core.records import Source, StagedFile
from etl.read.formats import read_chunks

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def staged(path: Path, fmt: str) -> StagedFile:
    return StagedFile(Source(0, str(path), path.name, fmt), path, path.stat().st_size)


def write_rows(path: Path, rows: list[tuple[str, str, int]]) -> Path:
    """JSON Lines or CSV (header id,note,n) by the path's name; gzipped for .gz."""
    if ".jsonl" in path.name:
        data = "".join(json.dumps({"id": i, "note": note, "n": n}) + "\n" for i, note, n in rows).encode()
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("id", "note", "n"))
        w.writerows(rows)
        data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def cfg_for(fmt: str, **kw: Any) -> ReadConfig:
    return ReadConfig(**({"parse": "reader"} if fmt == "csv" else {}), **kw)


def set_aside_run(st: StagedFile, cfg: ReadConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """The ids of the rows kept, and the dead-letter rows, as the workers make them."""
    kept: list[str] = []
    dead: list[dict[str, Any]] = []
    chunks = list(read_chunks(st, cfg, set_aside=True))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        df, bad = decode_chunk(chunk, cfg, "quarantine")
        kept += [str(i) for i in df["id"]]
        if bad is not None:
            part = encode_rejects(bad, chunk)
            assert part is not None
            dead += [json.loads(x) for x in part.data.splitlines()]
    return kept, dead


CASES = [("jsonl", ".jsonl"), ("jsonl", ".jsonl.gz"), ("csv", ".csv"), ("csv", ".csv.gz")]


@pytest.mark.parametrize(("fmt", "suffix"), CASES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_record_longer_than_max_record_bytes_is_set_aside_and_the_rest_read_on(
    tmp_path: Path, fmt: str, suffix: str, where: str
) -> None:
    rows = [(str(i), "short", 1) for i in range(40)]
    at = {"first": 0, "middle": 20, "last": 40}[where]
    rows.insert(at, ("L", "x" * (3 << 20), 1))  # 3 MiB, 2 MiB allowed
    st = staged(write_rows(tmp_path / f"long{suffix}", rows), fmt)
    line = at + (2 if fmt == "csv" else 1)  # CSV: the header is line 1
    for chunk_rows in (1, 7, 1000):
        kept, dead = set_aside_run(st, cfg_for(fmt, chunk_rows=chunk_rows, max_record_bytes="2MiB"))
        assert kept == [r[0] for r in rows if r[0] != "L"], chunk_rows  # every other row, in order
        (letter,) = dead
        assert (letter["source"], letter["line"], letter["step"]) == (st.source.name, line, "read")
        assert letter["reason"].startswith("record longer than read.max_record_bytes (2.0 MiB): 3.0 MiB")
        start = '{"id": "L", "note": "xxx' if fmt == "jsonl" else "L,xxx"
        assert len(letter["raw"]) == 1024 and letter["raw"].startswith(start)


@pytest.mark.parametrize(("fmt", "suffix"), CASES)
def test_under_fail_a_long_record_fails_naming_file_and_line(tmp_path: Path, fmt: str, suffix: str) -> None:
    rows = [(str(i), "short", 1) for i in range(10)]
    rows.insert(4, ("L", "y" * (3 << 20), 1))
    st = staged(write_rows(tmp_path / f"long{suffix}", rows), fmt)
    line = 5 + (fmt == "csv")
    with pytest.raises(DataError, match=rf"long{suffix}: the record at line {line} is longer") as info:
        list(read_chunks(st, cfg_for(fmt, max_record_bytes="2MiB")))
    assert info.value.item == f"long{suffix}[line {line}]"


def test_a_csv_header_longer_than_max_record_bytes_fails_even_when_setting_aside(tmp_path: Path) -> None:
    path = tmp_path / "head.csv"
    path.write_bytes(b"id," + b"h" * (2 << 20) + b"\n1,a\n")
    with pytest.raises(DataError, match="head.csv: the header is longer than read.max_record_bytes"):
        list(read_chunks(staged(path, "csv"), cfg_for("csv", max_record_bytes="1MiB"), set_aside=True))


def test_a_last_line_without_a_line_end_is_set_aside_too(tmp_path: Path) -> None:
    path = tmp_path / "open.jsonl"
    path.write_bytes(b'{"id": "1", "note": "a", "n": 1}\n{"id": "2", "note": "' + b"z" * (2 << 20))
    kept, dead = set_aside_run(staged(path, "jsonl"), cfg_for("jsonl", max_record_bytes="1MiB"))
    assert kept == ["1"]
    assert dead[0]["line"] == 2 and "no line end before the end of the file" in dead[0]["reason"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_skipping_a_record_holds_one_read_not_the_record(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"bomb.{fmt}.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"id": 1, "n": 1}\n{"id": 2, "n": "' if fmt == "jsonl" else b"id,n\n1,1\n2,")
        for _ in range(16):  # a 256 MiB record in about 256 KiB of gzip
            f.write(b"0" * (16 << 20))
        f.write(b'"}\n{"id": 3, "n": 3}\n' if fmt == "jsonl" else b"\n3,3\n")
    tracemalloc.start()
    try:
        chunks = list(read_chunks(staged(path, fmt), cfg_for(fmt, max_record_bytes="4MiB"), set_aside=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [c.set_aside[0][0] for c in chunks if c.set_aside] == [2 + (fmt == "csv")]
    assert sum(c.rows for c in chunks if not c.set_aside) == 2
    assert peak < 24 << 20  # max_record_bytes and a few reads, not the 256 MiB record


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("on_error", ["quarantine", "fail"])
def test_a_run_quarantines_or_fails_on_a_record_past_max_record_bytes(tmp_path: Path, fmt: str, on_error: str) -> None:
    rows = [(str(i), "short", 1) for i in range(30)]
    rows.insert(12, ("L", "y" * (3 << 20), 1))
    write_rows(tmp_path / f"big.{fmt}.gz", rows)
    line = 13 + (fmt == "csv")
    parse = 'parse = "reader"' if fmt == "csv" else ""
    (tmp_path / "job.toml").write_text(
        f"""
[job]
name = "long"
state_dir = "state"
[sources]
urls = ["big.{fmt}.gz"]
format = "{fmt}"
[read]
max_record_bytes = "2MiB"
chunk_rows = 5
{parse}
[transform]
workers = 2
on_error = "{on_error}"
steps = [{{op = "cast", columns = {{n = "int64"}}}}]
[output]
path = "out"
"""
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(tmp_path / "job.toml"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "Traceback" not in proc.stderr
    if on_error == "fail":
        assert proc.returncode == 1, proc.stderr
        assert f"big.{fmt}.gz" in proc.stderr and f"line {line}" in proc.stderr and "max_record_bytes" in proc.stderr
        assert not (tmp_path / "out").exists()
        return
    assert proc.returncode == 3, proc.stderr  # rows rejected
    letters = [
        json.loads(x) for f in (tmp_path / "out" / "_rejected").glob("*.jsonl") for x in f.read_text().splitlines()
    ]
    assert [(d["source"], d["line"], d["step"]) for d in letters] == [(f"big.{fmt}.gz", line, "read")]
    assert len(letters[0]["raw"]) == 1024
    import pyarrow.dataset as ds

    ids = sorted(int(i) for i in ds.dataset(tmp_path / "out", format="parquet").to_table()["id"].to_pylist())
    assert ids == list(range(30))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_many_long_lines_inside_one_read_are_each_set_aside_at_their_line(tmp_path: Path, fmt: str) -> None:
    rows = [(str(i), "w" * 2000 if i % 3 == 1 else "s", 1) for i in range(60)]  # 2 KB lines, 1 KiB allowed
    st = staged(write_rows(tmp_path / f"many.{fmt}", rows), fmt)
    kept, dead = set_aside_run(st, cfg_for(fmt, chunk_rows=4, max_record_bytes="1KiB"))
    assert kept == [r[0] for r in rows if r[1] == "s"]
    first = 2 if fmt == "csv" else 1
    assert [d["line"] for d in dead] == [first + i for i in range(60) if i % 3 == 1]


def test_a_jsonl_file_of_nothing_but_long_lines_is_all_set_aside_in_a_run(tmp_path: Path) -> None:
    """No line left to infer a schema from: every line is a dead letter, the file adds no
    rows and no columns (the steps, which name columns, do not run on it); the other file
    is published."""
    (tmp_path / "a.jsonl").write_bytes(
        b"".join(b'{"id": "%d", "n": "' % i + b"x" * (3 << 20) + b'"}\n' for i in (1, 2))
    )
    (tmp_path / "b.jsonl").write_bytes(b'{"id": "3", "n": 5}\n{"id": "4", "n": 6}\n')
    (tmp_path / "job.toml").write_text(
        """
[job]
name = "long"
state_dir = "state"
[sources]
urls = ["a.jsonl", "b.jsonl"]
format = "jsonl"
[read]
max_record_bytes = "2MiB"
[transform]
on_error = "quarantine"
steps = [{op = "cast", columns = {n = "int64"}}]
[output]
path = "out"
"""
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--config", str(tmp_path / "job.toml"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    letters = [
        json.loads(x) for f in (tmp_path / "out" / "_rejected").glob("*.jsonl") for x in f.read_text().splitlines()
    ]
    assert sorted((d["source"], d["line"]) for d in letters) == [("a.jsonl", 1), ("a.jsonl", 2)]
    import pyarrow.dataset as ds

    assert ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist() == [
        {"id": "3", "n": 5},
        {"id": "4", "n": 6},
    ]

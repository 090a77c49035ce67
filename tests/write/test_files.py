"""Right-sized output files (etl/write/files.py): real writers on real files, and a real
``python run.py`` killed with SIGKILL again and again, then resumed."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from etl.core.config import OutputConfig
from etl.core.parts import encode_parts
from etl.write import files
from etl.write.folder import OutputWriter
from tests.conftest import write_trips_csv
from tests.http_server import Stall, serve_folder_in_thread

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120  # seconds a test waits for a process before failing (a hang, never a timing check)


def frame(rows: int, seed: int = 0, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(start, start + rows, dtype="int64"),
            "k": rng.choice(["a", "b", "c"], rows),
            "v": rng.random(rows),
            "s": [f"text {i % 97}" for i in range(rows)],
            "cat": pd.Categorical(rng.choice(["x", "y", "z", "w"], rows)),
        }
    )


Chunk = tuple[int, int, pd.DataFrame]


def chunked(sources: list[pd.DataFrame], rows: int) -> list[Chunk]:
    """Each source cut into chunks of ``rows`` rows: (source, chunk, frame)."""
    return [(s, i // rows, df.iloc[i : i + rows]) for s, df in enumerate(sources) for i in range(0, len(df), rows)]


def cut(out: OutputConfig, chunks: list[Chunk], shuffle: int | None = None, run_id: str = "r") -> dict[str, bytes]:
    """Run the writer over ``chunks`` (in a shuffled arrival order, chunk counts announced
    last) and publish; returns the published files' bytes."""
    writer = OutputWriter(out, run_id)
    for s in sorted({s for s, _, _ in chunks}):
        writer.admit(s)  # chunks go into files as they arrive, in serial order
    order = list(chunks)
    if shuffle is not None:
        random.Random(shuffle).shuffle(order)
    for s, c, df in order:
        parts = encode_parts(df, out, source_index=s, chunk_index=c)
        writer.chunk_done(s, c, [writer.write(p) for p in parts])
    for s in sorted({s for s, _, _ in chunks}, reverse=shuffle is not None):
        writer.source_total(s, sum(1 for x, _, _ in chunks if x == s))
    for folder in writer.finish_files():
        writer.close_files(folder)
    writer.publish()
    root = Path(out.path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_files_reach_the_target_and_row_groups_hold_row_group_size_rows(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out", target_file_size="48KiB", row_group_size=1500)
    published = cut(out, chunked([frame(20_000), frame(7_000, 1, 20_000)], 1_000), shuffle=3)

    names = sorted(published)
    assert len(names) > 3 and names[0] == "part-00000.parquet"
    ids = []
    for i, name in enumerate(names):
        meta = pq.ParquetFile(tmp_path / "out" / name).metadata
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert all(n == 1500 for n in groups[:-1]) and groups[-1] <= 1500
        if i < len(names) - 1:  # every file but the last reaches the target at its last row group
            assert len(published[name]) >= out.target_file_size
            before_last = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups - 1))
            assert before_last < out.target_file_size * 2  # it closed at the first boundary past it
        ids += pq.read_table(tmp_path / "out" / name).column("id").to_pylist()
    assert ids == list(range(27_000))  # serial order: source, then chunk


def test_a_whole_partition_under_the_target_is_one_file(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out", partition_by=["k"])
    published = cut(out, chunked([frame(3_000), frame(2_000, 1, 3_000)], 250), shuffle=1)
    assert sorted(published) == ["k=a/part-00000.parquet", "k=b/part-00000.parquet", "k=c/part-00000.parquet"]
    got = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert sorted(got.column("id").to_pylist()) == list(range(5_000))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_bytes_depend_on_the_rows_only_not_on_chunks_or_their_arrival_order(tmp_path: Path, fmt: str) -> None:
    sources = [frame(9_000), frame(4_000, 1, 9_000), frame(500, 2, 13_000)]
    results = []
    for n, (rows, shuffle) in enumerate([(9_000, None), (1_000, 1), (777, 2), (64, 3)]):
        out = OutputConfig(
            path=tmp_path / f"out{n}", format=fmt, partition_by=["k"], target_file_size="32KiB", row_group_size=1000
        )
        results.append(cut(out, chunked(sources, rows), shuffle=shuffle))
    assert len(results[0]) > 3
    assert all(r == results[0] for r in results[1:])


def test_columns_of_mostly_distinct_values_skip_the_dictionary_and_repeated_ones_keep_it(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out", row_group_size=2_000)
    published = cut(out, chunked([frame(9_000)], 700), shuffle=4)

    meta = pq.ParquetFile(tmp_path / "out" / "part-00000.parquet").metadata
    assert meta.num_row_groups == 5
    for g in range(meta.num_row_groups):  # one choice per file, judged on its first row group
        group = meta.row_group(g)
        encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
        assert "RLE_DICTIONARY" not in encodings["id"] and "RLE_DICTIONARY" not in encodings["v"]  # all distinct
        assert all("RLE_DICTIONARY" in encodings[c] for c in ("k", "s", "cat"))  # 3, 97 and 4 values
    back = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pandas()
    want = frame(9_000)
    assert back["id"].tolist() == want["id"].tolist() and back["v"].tolist() == want["v"].tolist()
    assert back["s"].tolist() == want["s"].tolist() and list(published) == ["part-00000.parquet"]


def test_the_dictionary_choice_on_a_large_first_row_group_counts_what_the_probe_cannot_settle() -> None:
    rows = 4 * files.DISTINCT_PROBE_ROWS
    rng = np.random.default_rng(5)
    first = pa.table(
        {
            "id": np.arange(rows),  # all distinct: settled on the probe's rows
            "code": rng.integers(0, 10, rows),  # 10 values
            "sku": rng.integers(0, rows // 4, rows),  # ~23% distinct: the probe's rows look unique-ish
            "amount": rng.random(rows),
        }
    )
    assert files.dictionary_columns(first) == ["code", "sku"]


def wide_frame(rows: int, seed: int, start: int) -> pd.DataFrame:
    """Rows of 0.2-3 KB (a free-text column of varying length)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 3_000, rows)
    return pd.DataFrame({"id": np.arange(start, start + rows, dtype="int64"), "text": ["x" * int(n) for n in sizes]})


def test_very_wide_rows_cut_row_groups_by_bytes_at_the_same_rows_whatever_the_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 96 << 10
    monkeypatch.setattr(files, "ROW_GROUP_MAX_BYTES", limit)
    sources = [wide_frame(700, 0, 0), wide_frame(300, 1, 700)]
    results = []
    for n, (rows, shuffle) in enumerate([(700, None), (64, 1), (333, 2), (1, 3)]):
        out = OutputConfig(path=tmp_path / f"out{n}", target_file_size="1GiB", row_group_size=100_000)
        results.append(cut(out, chunked(sources, rows), shuffle=shuffle))
    assert all(r == results[0] for r in results[1:])  # the same bytes, cut at the same rows
    (name,) = results[0]
    pf = pq.ParquetFile(tmp_path / "out0" / name)
    assert pf.metadata.num_row_groups > 10  # not one 100,000-row group: 1,000 rows of ~1.6 KB
    for g in range(pf.metadata.num_row_groups):
        group = pf.read_row_group(g)
        assert int(files.row_bytes(group).sum()) <= limit
    assert pf.read().column("id").to_pylist() == list(range(1_000))


def test_more_partitions_than_open_files_close_the_least_recent_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``MAX_OPEN_FILES`` the files are smaller than the rule, but every row is there,
    in order, and the bytes still do not depend on the order chunks arrive in (they do
    depend on the chunk size there: see the module docstring)."""
    monkeypatch.setattr(files, "MAX_OPEN_FILES", 2)
    sources = [frame(3_000), frame(3_000, 1, 3_000)]
    outs = []
    for n in range(2):
        out = OutputConfig(path=tmp_path / f"out{n}", partition_by=["k"], row_group_size=400)
        outs.append(cut(out, chunked(sources, 100), shuffle=n))
    assert outs[0] == outs[1]
    assert len(outs[0]) > 3  # files closed early when a third partition came
    got = ds.dataset(tmp_path / "out0", format="parquet", partitioning="hive").to_table()
    assert sorted(got.column("id").to_pylist()) == list(range(6_000))


def test_carried_rows_are_read_back_from_the_published_files_and_give_the_same_bytes(tmp_path: Path) -> None:
    sources = [frame(5_000), frame(3_000, 1, 5_000), frame(2_000, 2, 8_000)]
    out = OutputConfig(path=tmp_path / "out", partition_by=["k"], target_file_size="24KiB", row_group_size=700)
    first = OutputWriter(out, "r1")
    for s in range(3):
        first.admit(s)
    for s, c, df in chunked(sources, 900):
        parts = encode_parts(df, out, source_index=s, chunk_index=c)
        first.chunk_done(s, c, [first.write(p) for p in parts])
    for s in range(3):
        first.source_total(s, sum(1 for x, _, _ in chunked(sources, 900) if x == s))
    for folder in first.finish_files():
        first.close_files(folder)
    spans = first.spans()
    first.publish()
    published = {str(p.relative_to(out.path)): p.read_bytes() for p in Path(out.path).rglob("*") if p.is_file()}
    assert sum(sp["rows"] for v in spans.values() for sp in v) == 10_000

    second = OutputWriter(out, "r2")  # source 1 unchanged (carried), 0 and 2 processed again
    for s, c, df in chunked(sources, 1_300):
        if s != 1:
            parts = encode_parts(df, out, source_index=s, chunk_index=c)
            second.chunk_done(s, c, [second.write(p) for p in parts])
    second.add_rows(
        1, [(Path(out.path) / x["path"], x["path"].rpartition("/")[0], x["start"], x["rows"]) for x in spans[1]]
    )
    second.source_total(0, 4)
    second.source_total(2, 2)
    for folder in second.finish_files():
        second.close_files(folder)
    second.publish()
    again = {str(p.relative_to(out.path)): p.read_bytes() for p in Path(out.path).rglob("*") if p.is_file()}
    assert again == published


def test_an_adopted_source_that_changed_is_forgotten_before_its_rows_reach_a_file(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out")
    dead = OutputWriter(out, "dead")  # killed after spooling source 0's chunk
    spooled = [dead.write(p) for p in encode_parts(frame(500, 1), out, source_index=0, chunk_index=0)]
    writer = OutputWriter(out, "next", adopt=dead.tmp)  # its pieces wait: source 0 is not admitted yet
    for relpath in spooled:  # the source changed since (what Commits does): forgotten
        writer.remove(relpath)
    writer.admit(0)
    parts = encode_parts(frame(300, 2, 1_000), out, source_index=0, chunk_index=0)
    writer.chunk_done(0, 0, [writer.write(p) for p in parts])
    writer.source_total(0, 1)
    for folder in writer.finish_files():
        writer.close_files(folder)
    assert writer.publish() == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").column("id").to_pylist() == list(range(1_000, 1_300))


def test_a_discarded_run_leaves_no_file_and_no_half_written_one(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out", row_group_size=100)
    writer = OutputWriter(out, "r")
    writer.admit(0)
    parts = encode_parts(frame(1_000), out, source_index=0, chunk_index=0)
    writer.chunk_done(0, 0, [writer.write(p) for p in parts])  # a file is open, row groups written
    assert list(writer.tmp.glob("*.inprogress"))
    writer.discard()
    assert not writer.tmp.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------- kill -9, in a loop

JOB = """
[job]
name = "k9"
state_dir = "{state}"

[sources]
urls = [{urls}]

[download]
retry = {{attempts = 1}}

[read]
chunk_rows = 70

[transform]
executor = "thread"
workers = 2
on_error = "skip"
steps = [{{op = "cast", columns = {{fare = "float64", zone = "int64"}}}}]

[output]
path = "{out}"
partition_by = ["zone"]
target_file_size = "4KiB"
row_group_size = 50
"""


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.timeout(240)  # five real runs on a shared machine; a hang still fails
def test_kill_9_at_each_commit_again_and_again_then_resume_gives_a_clean_runs_bytes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    n_sources = 7
    for k in range(n_sources):
        write_trips_csv(data / f"t{k}.csv", rows=300 + 13 * k, seed=k, start_id=10_000 * k)
    last = f"t{n_sources - 1}.csv"
    rounds = 3
    # Every run's first request for the last file stalls, so each killed run is mid-way.
    base, stop = serve_folder_in_thread(data, {last: [Stall(after_bytes=2048)] * rounds})
    try:
        urls = ", ".join(json.dumps(f"{base}/t{k}.csv") for k in range(n_sources))
        job = tmp_path / "job.toml"
        job.write_text(JOB.format(state="state", out="out", urls=urls))
        for n in range(rounds):
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "run", "--config", str(job), "--quiet", "--log-format", "json"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stderr is not None
            saved = False
            for line in proc.stderr:  # kill at this run's first commit: other sources are mid-way
                if json.loads(line)["message"].startswith("manifest saved"):
                    saved = True
                    break
            assert saved, f"round {n}: the run ended (exit {proc.wait(WAIT)}) before committing"
            proc.kill()
            proc.wait(WAIT)
            assert not (tmp_path / "out").exists()  # a killed run publishes nothing
        # The same URLs (the resume matches sources by URL); a stall a killed run did not use
        # up costs one short read timeout and a retry (download settings do not change the output).
        retry = ["--set", "download.timeout.read=2", "--set", "download.retry.attempts=3"]
        cmd = [sys.executable, str(ROOT / "run.py"), "run", "--config", str(job), "--quiet", *retry]
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT, check=False)
        assert again.returncode == 0, again.stderr
        assert "resumed" in again.stderr or "resuming" in again.stderr
        clean = tmp_path / "clean.toml"
        clean.write_text(JOB.format(state="clean-state", out="clean-out", urls=urls))
        cmd = [sys.executable, str(ROOT / "run.py"), "run", "--config", str(clean), "--quiet", *retry]
        reference = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT, check=False)
        assert reference.returncode == 0, reference.stderr
    finally:
        stop()
    published = _files(tmp_path / "out")
    assert len([n for n in published if n.endswith(".parquet")]) > 8  # several files per partition
    assert published == _files(tmp_path / "clean-out")
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".out.tmp-") or p.name.endswith(".inprogress")]


def test_buffered_rows_of_open_files_stay_on_disk_until_their_row_group_is_encoded(tmp_path: Path) -> None:
    # Issue 18's 300 MiB budget: rows waiting for a row group (one per open file) were held
    # as tables over the mapped spool pieces, ~100 MiB on the test job's 6 partitions.
    out = OutputConfig(path=tmp_path / "out", partition_by=["k"], row_group_size=100_000)
    writer = OutputWriter(out, "r")
    writer.admit(0)
    for c in range(30):
        parts = encode_parts(frame(1_000, seed=c, start=c * 1_000), out, source_index=0, chunk_index=c)
        writer.chunk_done(0, c, [writer.write(p) for p in parts])
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if "_spool" in line]
    assert mapped == []  # 30 chunks x 3 partitions buffered, none of them in memory
    writer.source_total(0, 30)
    for folder in writer.finish_files():
        writer.close_files(folder)
    writer.publish()
    table = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 30_000
    for k in ("a", "b", "c"):  # each partition's rows in serial order
        ids = pq.read_table(tmp_path / "out" / f"k={k}").column("id").to_pylist()
        assert ids == sorted(ids) and len(ids) > 0

"""One run's bookkeeping against the manifest, driven the way the pipeline drives it.

Each "run" here is a real ``Commits`` with a real ``OutputWriter`` on real files: reader
side (``check``, ``read_done``) and writer side (``written``) are called as the pipeline's
threads call them, then the run publishes, fails, or simply stops (a crash: the objects
are dropped and nothing else runs). The next run starts from what is on disk.
The recover() crash cases on a hand-written manifest are in ``tests/run/test_state.py``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from etl.core.config import JobConfig, load_job
from etl.core.durable import write_json
from etl.core.parts import encode_parts
from etl.core.records import ChunkResult, Part, Source, StagedFile
from etl.run.commits import Commits
from etl.run.state import Manifest
from etl.write.folder import OutputWriter

JOB = """
[job]
name = "c"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[transform]
steps = [{op = "filter", expr = "x > 0"}]

[output]
path = "out"
mode = "MODE"
"""

NAMES = ("a.csv", "b.csv", "c.csv")


def job(tmp_path: Path, mode: str = "overwrite", *overrides: str) -> JobConfig:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in NAMES:
        if not (data / name).exists():
            (data / name).write_text(f"x\n1\n2\n{name}\n")
    (tmp_path / "job.toml").write_text(JOB.replace("MODE", mode))
    return load_job(tmp_path / "job.toml", list(overrides))


def sources(tmp_path: Path, names: tuple[str, ...] = NAMES) -> list[Source]:
    return [Source(i, str(tmp_path / "data" / n), n, "csv") for i, n in enumerate(names)]


def staged(src: Source) -> StagedFile:
    return StagedFile(src, Path(src.url), Path(src.url).stat().st_size)


class Run:
    """One run's Commits and OutputWriter, started the way the pipeline starts them."""

    def __init__(self, cfg: JobConfig, run_id: str, srcs: list[Source], full_refresh: bool = False) -> None:
        self.cfg, self.srcs = cfg, srcs
        self.commits = Commits(cfg, run_id, full_refresh)
        self.adopted = self.commits.recover(srcs)
        OutputWriter.clean_leftovers(cfg.output, keep=self.adopted)
        self.writer = OutputWriter(cfg.output, run_id, adopt=self.adopted)
        self.commits.begin(self.writer)

    def chunk(self, src: Source, i: int, rows: int = 2) -> None:
        """Writer thread: one chunk's part is in the temp folder."""
        part = Part(f"part-{src.index:05d}-{i:06d}.parquet", f"{src.name}#{i}".encode(), rows)
        rel = self.writer.write(part)
        self.commits.written(
            ChunkResult(src.index, i, rows_in=rows + 1, rows_out=rows, rows_rejected=1), [(rel, rows, len(part.data))]
        )

    def process(self, src: Source, chunks: int = 2) -> bool:
        """Reader and writer for one source; False when it was skipped."""
        if not self.commits.check(staged(src)):
            return False
        for i in range(chunks):
            self.chunk(src, i)
        self.commits.read_done(src, chunks)
        return True

    def publish(self) -> list[str]:
        self.commits.publishing()
        published = self.writer.publish()
        self.commits.published()
        return published


def manifest(cfg: JobConfig) -> Manifest:
    return Manifest.load(cfg.job_state_dir)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def statuses(run: Run) -> list[tuple[str, str]]:
    return [(s["name"], s["status"]) for s in run.commits.report()]


# ---------------------------------------------------------------- committing


def test_a_clean_run_commits_every_source_and_publishes_the_manifest(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    run = Run(cfg, "r1", srcs)
    assert [run.process(s) for s in srcs] == [True, True, True]
    published = run.publish()
    assert published == [f"part-{i:05d}-{c:06d}.parquet" for i in range(3) for c in range(2)]
    m = manifest(cfg)
    assert m.pending is None and set(m.published) == {s.url for s in srcs}
    e = m.published[srcs[1].url]
    assert (e["index"], e["name"], e["rows_in"], e["rows_out"], e["rows_rejected"]) == (1, "b.csv", 6, 4, 2)
    assert [p["path"] for p in e["parts"]] == ["part-00001-000000.parquet", "part-00001-000001.parquet"]
    assert e["size"] == os.stat(srcs[1].url).st_size and e["run_id"] == "r1" and len(e["sha256"]) == 64
    assert run.commits.report() == [
        {"index": i, "name": n, "status": "processed", "rows_in": 6, "rows_out": 4, "rows_rejected": 2, "parts": 2}
        for i, n in enumerate(NAMES)
    ]


def test_a_source_is_committed_only_once_its_chunk_count_is_known_and_every_chunk_written(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    a, b = sources(tmp_path)[:2]
    run = Run(cfg, "r1", [a, b])
    assert run.commits.check(staged(a)) and run.commits.check(staged(b))
    run.chunk(a, 0)
    run.chunk(a, 1)  # every chunk written, but the reader may still cut more
    assert manifest(cfg).pending["sources"] == {}
    run.commits.read_done(a, 2)
    assert set(manifest(cfg).pending["sources"]) == {a.url}  # the first commit is saved at once
    run.commits.read_done(b, 3)  # the reader is done first this time
    run.chunk(b, 0)
    run.chunk(b, 1)
    assert b.url not in run.commits.manifest.pending["sources"]  # one chunk still being written
    run.chunk(b, 2)
    assert b.url in run.commits.manifest.pending["sources"]
    assert len(run.commits.manifest.pending["sources"][b.url]["parts"]) == 3


def test_chunks_written_from_many_threads_are_all_counted(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    (a,) = sources(tmp_path)[:1]
    run = Run(cfg, "r1", [a])
    assert run.commits.check(staged(a))
    chunks, threads = 400, 8
    start = threading.Barrier(threads)

    def writer(k: int) -> None:
        start.wait()
        for i in range(k, chunks, threads):
            run.chunk(a, i)

    pool = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    run.commits.read_done(a, chunks)  # while the writers run
    for t in pool:
        t.join()
    entry = run.commits.manifest.pending["sources"][a.url]
    assert len(entry["parts"]) == chunks and entry["rows_out"] == 2 * chunks and entry["rows_in"] == 3 * chunks
    assert len({p["path"] for p in entry["parts"]}) == chunks
    assert run.commits.report()[0]["parts"] == chunks


# -------------------------------------------------------------- crash and resume


def test_a_crashed_run_is_resumed_without_processing_committed_sources_again(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    dead = Run(cfg, "dead", srcs)
    dead.process(srcs[0])  # committed (the first commit is saved at once)
    assert dead.commits.check(staged(srcs[1]))
    dead.chunk(srcs[1], 0)  # half done: one of two chunks written, reader not finished
    tmp = dead.writer.tmp
    del dead  # kill -9: nothing else runs

    nxt = Run(cfg, "next", srcs)
    assert nxt.adopted == tmp
    assert files(tmp) == ["part-00000-000000.parquet", "part-00000-000001.parquet"]  # half-work purged
    assert [nxt.process(s) for s in srcs] == [False, True, True]
    assert statuses(nxt) == [("a.csv", "resumed"), ("b.csv", "processed"), ("c.csv", "processed")]
    assert nxt.commits.report()[0]["rows_out"] == 4 and nxt.commits.report()[0]["parts"] == 2
    assert nxt.publish() == [f"part-{i:05d}-{c:06d}.parquet" for i in range(3) for c in range(2)]
    assert (tmp_path / "out" / "part-00000-000000.parquet").read_bytes() == b"a.csv#0"
    assert set(manifest(cfg).published) == {s.url for s in srcs} and manifest(cfg).pending is None


def spooled_chunk(run: Run, i: int) -> str:
    """Chunk ``i`` of source 0 as a real piece, written by a worker into the writer's folder
    and committed by the writer; returns its relpath in the temp folder."""
    frame = pd.DataFrame({"x": [1, 2]})
    (part,) = encode_parts(frame, run.cfg.output, source_index=0, chunk_index=i, spool=run.writer.incoming())
    rel = run.writer.write(part)
    run.commits.written(ChunkResult(0, i, rows_in=2, rows_out=2, rows_rejected=0), [(rel, part.rows, part.nbytes)])
    return rel


@pytest.mark.parametrize("loss", ["zeros", "cut short", "missing"])
def test_a_spooled_piece_an_os_crash_lost_sends_its_source_through_again(tmp_path: Path, loss: str) -> None:
    """Pieces are spooled without fsync: a kill -9 keeps them (page cache), an OS crash may
    not. Resume reads each piece back against the manifest and redoes a source that lost one."""
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    dead = Run(cfg, "dead", srcs)
    assert dead.commits.check(staged(srcs[0]))
    rel = [spooled_chunk(dead, i) for i in range(2)][-1]
    dead.commits.read_done(srcs[0], 2)  # committed, and saved at once (the first commit)
    tmp, piece = dead.writer.tmp, dead.writer.tmp / rel
    del dead  # the machine went down
    if loss == "zeros":  # the size reached the disk, the data did not
        piece.write_bytes(bytes(piece.stat().st_size))
    elif loss == "cut short":
        piece.write_bytes(piece.read_bytes()[:-100])
    else:
        piece.unlink()

    nxt = Run(cfg, "next", srcs)

    assert nxt.adopted == tmp and files(tmp) == []  # the source's other piece went with it
    assert [nxt.process(s) for s in srcs] == [True, True, True]
    assert statuses(nxt)[0] == ("a.csv", "processed")


def test_whole_spooled_pieces_are_adopted_as_committed(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    dead = Run(cfg, "dead", srcs)
    assert dead.commits.check(staged(srcs[0]))
    spooled_chunk(dead, 0)
    dead.commits.read_done(srcs[0], 1)
    del dead  # kill -9: the page cache keeps the piece

    nxt = Run(cfg, "next", srcs)

    assert [nxt.process(s) for s in srcs] == [False, True, True]
    assert statuses(nxt)[0] == ("a.csv", "resumed")


def test_an_adopted_source_that_changed_since_is_processed_again(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    dead = Run(cfg, "dead", srcs)
    dead.process(srcs[0], chunks=3)
    del dead
    Path(srcs[0].url).write_text("x\n5\n")  # changed: new size and content
    nxt = Run(cfg, "next", srcs)
    assert nxt.process(srcs[0], chunks=1)
    assert files(nxt.writer.tmp) == ["part-00000-000000.parquet"]  # the stale parts were removed
    assert statuses(nxt)[0] == ("a.csv", "processed")
    assert nxt.publish() == ["part-00000-000000.parquet"]


def test_interrupted_run_keeps_its_temp_folder_for_the_next_run(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    run = Run(cfg, "stopped", srcs)
    run.process(srcs[0])
    assert run.commits.failed(interrupted=True) is True
    assert manifest(cfg).pending["run_id"] == "stopped" and srcs[0].url in manifest(cfg).pending["sources"]
    assert Run(cfg, "next", srcs).adopted == run.writer.tmp


def test_a_failed_run_or_one_that_committed_nothing_is_not_kept(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    run = Run(cfg, "failed", srcs)
    run.process(srcs[0])
    assert run.commits.failed() is False
    assert manifest(cfg).pending is None
    empty = Run(cfg, "empty", srcs)
    assert empty.commits.failed(interrupted=True) is False  # nothing committed: nothing to resume
    assert manifest(cfg).pending is None


# ------------------------------------------------------------------ unchanged


def test_overwrite_skips_unchanged_sources_and_carries_their_parts_over(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    first = Run(cfg, "r1", srcs)
    for s in srcs:
        first.process(s)
    first.publish()
    out = tmp_path / "out"
    inode = (out / "part-00000-000000.parquet").stat().st_ino
    Path(srcs[2].url).write_text("x\n1\n2\n3\nchanged\n")

    second = Run(cfg, "r2", srcs)
    assert [second.process(s, chunks=1) for s in srcs] == [False, False, True]
    assert (second.writer.tmp / "part-00000-000000.parquet").stat().st_ino == inode  # a hard link, not a copy
    assert statuses(second) == [("a.csv", "unchanged"), ("b.csv", "unchanged"), ("c.csv", "processed")]
    assert second.commits.report()[0]["rows_out"] == 4  # the carried source's numbers
    assert second.publish() == [
        "part-00000-000000.parquet",
        "part-00000-000001.parquet",
        "part-00001-000000.parquet",
        "part-00001-000001.parquet",
        "part-00002-000000.parquet",
    ]
    assert (out / "part-00000-000001.parquet").read_bytes() == b"a.csv#1"
    assert set(manifest(cfg).published) == {s.url for s in srcs}


def test_an_unchanged_source_whose_index_moved_has_its_parts_renumbered(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    a, b, _ = sources(tmp_path)
    first = Run(cfg, "r1", [a, b])
    first.process(a)
    first.process(b)
    first.publish()
    moved = [Source(0, b.url, b.name, "csv"), Source(1, a.url, a.name, "csv")]
    second = Run(cfg, "r2", moved)
    assert not second.process(moved[0]) and not second.process(moved[1])
    assert second.publish() == [
        "part-00000-000000.parquet",
        "part-00000-000001.parquet",
        "part-00001-000000.parquet",
        "part-00001-000001.parquet",
    ]
    assert (tmp_path / "out" / "part-00000-000000.parquet").read_bytes() == b"b.csv#0"
    assert (tmp_path / "out" / "part-00001-000001.parquet").read_bytes() == b"a.csv#1"
    assert manifest(cfg).published[a.url]["index"] == 1


def test_a_touched_file_with_the_same_bytes_is_unchanged_by_its_hash(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    (a,) = sources(tmp_path)[:1]
    first = Run(cfg, "r1", [a])
    first.process(a)
    first.publish()
    os.utime(a.url, ns=(1, 1))
    second = Run(cfg, "r2", [a])
    assert not second.process(a)
    assert statuses(second) == [("a.csv", "unchanged")]


def test_an_unchanged_source_whose_published_parts_are_gone_is_processed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = job(tmp_path)
    (a,) = sources(tmp_path)[:1]
    first = Run(cfg, "r1", [a])
    first.process(a)
    first.publish()
    (tmp_path / "out" / "part-00000-000001.parquet").unlink()
    second = Run(cfg, "r2", [a])
    with caplog.at_level(logging.WARNING, logger="etl.state"):
        assert second.process(a)
    assert "published parts are missing" in caplog.text
    assert second.publish() == ["part-00000-000000.parquet", "part-00000-000001.parquet"]


def test_append_mode_never_appends_a_source_twice(tmp_path: Path) -> None:
    cfg = job(tmp_path, "append")
    a, b, c = sources(tmp_path)
    first = Run(cfg, "r1", [a, b])
    first.process(a)
    first.process(b)
    first.publish()
    second = Run(cfg, "r2", [a, b, c])
    assert [second.process(s) for s in (a, b, c)] == [False, False, True]
    assert files(second.writer.tmp) == ["part-r2-00002-000000.parquet", "part-r2-00002-000001.parquet"]
    second.publish()
    assert len(files(tmp_path / "out")) == 6
    assert set(manifest(cfg).published) == {a.url, b.url, c.url}
    third = Run(cfg, "r3", [a, b, c], full_refresh=False)
    assert not any(third.process(s) for s in (a, b, c))


def test_changed_settings_reprocess_everything_in_overwrite_mode(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    (a,) = sources(tmp_path)[:1]
    first = Run(cfg, "r1", [a])
    first.process(a)
    first.publish()
    assert not Run(job(tmp_path, "overwrite", "transform.workers=3"), "r2", [a]).process(a)  # not output-shaping
    assert Run(job(tmp_path, "overwrite", "read.chunk_rows=7"), "r3", [a]).process(a)


def test_full_refresh_ignores_the_published_sources(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    (a,) = sources(tmp_path)[:1]
    first = Run(cfg, "r1", [a])
    first.process(a)
    first.publish()
    assert Run(cfg, "r2", [a], full_refresh=True).process(a)


def test_published_entries_take_the_download_validators(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    (a,) = sources(tmp_path)[:1]
    run = Run(cfg, "r1", [a])
    run.process(a)
    write_json(
        cfg.job_state_dir / "sources.json",
        {"version": 1, "files": {a.url: {"etag": '"e1"', "last_modified": "Mon, 01 Jun 2026 00:00:00 GMT"}}},
    )
    run.publish()
    e = manifest(cfg).published[a.url]
    assert (e["etag"], e["last_modified"]) == ('"e1"', "Mon, 01 Jun 2026 00:00:00 GMT")


# ----------------------------------------------------------------------- dry run


def test_plan_says_what_a_run_would_do_without_changing_anything(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    a, b, c = sources(tmp_path)
    remote = Source(3, "https://example.invalid/d.csv", "d.csv", "csv")
    assert Commits(cfg, "dry", False).plan([a, b, remote]) == ["process", "process", "fetch and process"]
    first = Run(cfg, "r1", [a, b, c])
    for s in (a, b, c):
        first.process(s)
    first.publish()
    Path(b.url).write_text("x\nchanged\n")
    before = (cfg.job_state_dir / "manifest.json").read_bytes()
    assert Commits(cfg, "dry", False).plan([a, b, remote]) == [
        "skip: unchanged",
        "process: changed",
        "fetch and process",
    ]
    assert Commits(cfg, "dry", True).plan([a]) == ["process"]
    assert (cfg.job_state_dir / "manifest.json").read_bytes() == before


def test_plan_names_the_run_a_resume_would_adopt(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    a, b, _ = sources(tmp_path)
    dead = Run(cfg, "dead", [a, b])
    dead.process(a)
    del dead
    assert Commits(cfg, "dry", False).plan([a, b]) == ["resume (committed by run dead): unchanged", "process"]


def test_a_file_the_download_stage_hashed_is_not_read_again(tmp_path: Path) -> None:
    """The manifest takes the sha256 the download stage computed while the bytes arrived:
    given one that differs from the file's real hash, it is the one recorded (so the file
    was not read a second time); without one, the file is hashed here."""
    import hashlib

    cfg = job(tmp_path)
    srcs = sources(tmp_path, ("a.csv", "b.csv"))
    run = Run(cfg, "r1", srcs)
    told = "f" * 64  # not a.csv's hash: only a lookup, never a read, can record it
    downloaded = StagedFile(srcs[0], Path(srcs[0].url), Path(srcs[0].url).stat().st_size, sha256=told)
    assert run.commits.check(downloaded)
    assert run.commits.check(staged(srcs[1]))
    for src in srcs:
        run.chunk(src, 0)
        run.commits.read_done(src, 1)
    run.publish()
    recorded = manifest(cfg).published
    assert recorded[srcs[0].url]["sha256"] == told
    assert recorded[srcs[1].url]["sha256"] == hashlib.sha256(Path(srcs[1].url).read_bytes()).hexdigest()

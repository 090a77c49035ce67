"""The manifest's crash cases, on real files: what the next run settles, adopts or drops."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from etl.core.config import JobConfig, load_job
from etl.core.parts import APPEND_LIST, renumbered
from etl.core.records import Source, StagedFile
from etl.run.commits import Commits
from etl.run.state import (
    Manifest,
    file_sha256,
    fingerprint,
    identity,
    is_unchanged,
)
from etl.write.folder import OutputWriter

JOB = """
[job]
name = "j"
state_dir = "state"

[sources]
urls = ["data/*.csv"]

[transform]
steps = [{op = "filter", expr = "x > 0"}]

[output]
path = "out"
mode = "MODE"
"""


def job(tmp_path: Path, mode: str = "overwrite", *overrides: str) -> JobConfig:
    (tmp_path / "data").mkdir(exist_ok=True)
    for name in ("a.csv", "b.csv"):
        if not (tmp_path / "data" / name).exists():
            (tmp_path / "data" / name).write_text(f"x\n1\n2\n{name}\n")
    (tmp_path / "job.toml").write_text(JOB.replace("MODE", mode))
    return load_job(tmp_path / "job.toml", list(overrides))


def sources(tmp_path: Path) -> list[Source]:
    return [Source(i, str(tmp_path / "data" / n), n, "csv") for i, n in enumerate(("a.csv", "b.csv"))]


def entry(index: int, name: str, parts: dict[str, bytes]) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "size": 1,
        "sha256": "0" * 64,
        "rows_in": 2,
        "rows_out": 2,
        "rows_rejected": 0,
        "parts": [{"path": p, "rows": 1, "bytes": len(b)} for p, b in parts.items()],
    }


def save_manifest(cfg: JobConfig, pending: dict[str, Any] | None, published: dict[str, Any] | None = None) -> None:
    m = Manifest.load(cfg.job_state_dir)
    m.data.update(pending=pending, sources=published or {}, fingerprint=fingerprint(cfg))
    m.save()


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_publish_that_finished_before_the_manifest_did_is_settled(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    done = {srcs[0].url: entry(0, "a.csv", {"part-00000-000000.parquet": b"x"})}
    gone = tmp_path / ".out.tmp-dead"  # published: renamed to out/
    save_manifest(
        cfg, {"run_id": "dead", "tmp": str(gone), "fingerprint": fingerprint(cfg), "publishing": True, "sources": done}
    )
    assert Commits(cfg, "next", False).recover(srcs) is None
    m = Manifest.load(cfg.job_state_dir)
    assert m.pending is None and set(m.published) == set(done)


def test_adoption_keeps_only_committed_intact_parts(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    tmp = tmp_path / ".out.tmp-dead"
    good = {"k=1/part-00000-000000.parquet": b"aaaa", "_rejected/rejected-00000-000000.jsonl": b"{}"}
    cut = {"k=1/part-00001-000000.parquet": b"bbbb"}
    for rel, data in {**good, **cut, "k=2/part-00001-000001.parquet": b"stray"}.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    (tmp / "k=1/part-00001-000000.parquet").write_bytes(b"bb")  # listed, but shorter than recorded
    (tmp / "k=2/.part-00001-000002.parquet.x1y2.tmp").write_bytes(b"half")  # durable's temp file
    other = tmp_path / ".out.tmp-older"
    other.mkdir()
    pending = {srcs[0].url: entry(0, "a.csv", good), srcs[1].url: entry(1, "b.csv", cut)}
    save_manifest(
        cfg,
        {"run_id": "dead", "tmp": str(tmp), "fingerprint": fingerprint(cfg), "publishing": False, "sources": pending},
    )

    commits = Commits(cfg, "next", False)
    assert commits.recover(srcs) == tmp
    assert set(commits.adopted) == {srcs[0].url}
    assert files(tmp) == sorted(good)
    OutputWriter.clean_leftovers(cfg.output, keep=tmp)
    assert tmp.is_dir() and not other.exists()
    writer = OutputWriter(cfg.output, "next", adopt=tmp)
    commits.begin(writer)
    assert Manifest.load(cfg.job_state_dir).pending["sources"] == commits.adopted
    assert sorted(writer.publish()) == sorted(good)
    assert files(tmp_path / "out") == sorted(good)


def test_a_committed_source_whose_index_moved_is_dropped(tmp_path: Path) -> None:
    cfg = job(tmp_path)
    srcs = sources(tmp_path)
    tmp = tmp_path / ".out.tmp-dead"
    tmp.mkdir()
    (tmp / "part-00000-000000.parquet").write_bytes(b"a")
    save_manifest(
        cfg,
        {
            "run_id": "dead",
            "tmp": str(tmp),
            "fingerprint": fingerprint(cfg),
            "publishing": False,
            "sources": {srcs[0].url: entry(0, "a.csv", {"part-00000-000000.parquet": b"a"})},
        },
    )
    moved = [Source(0, srcs[1].url, "b.csv", "csv"), Source(1, srcs[0].url, "a.csv", "csv")]
    commits = Commits(cfg, "next", False)
    assert commits.recover(moved) == tmp and commits.adopted == {} and files(tmp) == []


@pytest.mark.parametrize("why", ["append-cut", "settings", "full-refresh"])
def test_pending_work_that_cannot_be_trusted_is_not_adopted(tmp_path: Path, why: str) -> None:
    cfg = job(tmp_path, "append")
    srcs = sources(tmp_path)
    tmp = tmp_path / ".out.tmp-dead"
    (tmp_path / "out").mkdir()
    tmp.mkdir()
    rel = "part-dead-00000-000000.parquet"
    if why == "append-cut":  # died while moving parts in: one is already in out/
        (tmp_path / "out" / rel).write_bytes(b"a")
        (tmp / APPEND_LIST).write_text(rel)
    else:
        (tmp / rel).write_bytes(b"a")
    save_manifest(
        cfg,
        {
            "run_id": "dead",
            "tmp": str(tmp),
            "fingerprint": fingerprint(cfg),
            "publishing": True,
            "sources": {srcs[0].url: entry(0, "a.csv", {rel: b"a"})},
        },
    )
    if why == "settings":
        cfg = job(tmp_path, "append", "read.chunk_rows=7")
    commits = Commits(cfg, "next", why == "full-refresh")
    assert commits.recover(srcs) is None
    assert Manifest.load(cfg.job_state_dir).pending is None  # saved before the folder goes
    OutputWriter.clean_leftovers(cfg.output)
    assert not tmp.exists() and files(tmp_path / "out") == []


def test_unchanged_local_file_by_stat_or_by_content(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("x\n1\n")
    src = Source(0, str(path), "a.csv", "csv")

    def staged() -> StagedFile:
        return StagedFile(src, path, path.stat().st_size)

    first = staged()
    recorded = identity(first) | {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    hashed: list[int] = []

    def sha() -> str:
        hashed.append(1)
        return file_sha256(path)

    assert is_unchanged(first, recorded, identity(first), sha) and hashed == []  # stat alone
    os.utime(path, ns=(1, 1))  # touched: same bytes
    assert is_unchanged(staged(), recorded, identity(staged()), sha) and hashed == [1]
    path.write_text("x\n2\n")  # same size, new content
    assert not is_unchanged(staged(), recorded, identity(staged()), sha)


def test_remote_304_is_unchanged_only_with_the_recorded_size(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("x\n1\n")
    src = Source(0, "http://h/a.csv", "a.csv", "csv")
    not_modified = StagedFile(src, path, 4, unchanged=True)
    assert is_unchanged(not_modified, {"size": 4}, identity(not_modified), lambda: "")
    assert not is_unchanged(not_modified, {"size": 5}, identity(not_modified), lambda: "")


def test_renumbered_parts_keep_folder_chunk_and_kind() -> None:
    assert renumbered("m=1/part-00003-000012.parquet", 5) == "m=1/part-00005-000012.parquet"
    assert renumbered("_rejected/rejected-00003-000000.jsonl", 0) == "_rejected/rejected-00000-000000.jsonl"
    assert renumbered("part-00003-000001.csv", 12345) == "part-12345-000001.csv"


def test_fingerprint_follows_output_shaping_settings_only(tmp_path: Path) -> None:
    base = fingerprint(job(tmp_path))
    assert fingerprint(job(tmp_path, "overwrite", "transform.workers=7", "read.threads=3")) == base
    assert fingerprint(job(tmp_path, "overwrite", "read.chunk_rows=10")) != base
    assert fingerprint(job(tmp_path, "overwrite", 'transform.steps[0].expr="x > 1"')) != base
    assert fingerprint(job(tmp_path, "overwrite", "output.format=csv")) != base


def test_unreadable_manifest_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = job(tmp_path)
    cfg.job_state_dir.mkdir(parents=True)
    (cfg.job_state_dir / "manifest.json").write_text('{"version": 1, "sources": {')
    with caplog.at_level(logging.WARNING):
        m = Manifest.load(cfg.job_state_dir)
    assert m.published == {} and m.pending is None and "manifest.json" in caplog.text
    (cfg.job_state_dir / "manifest.json").write_text(json.dumps({"version": 99}))
    assert Manifest.load(cfg.job_state_dir).published == {}


# --------------------------------------------------------- no secret on disk (issue 18)


def test_no_url_secret_in_clear_anywhere_in_the_state_folder_or_the_output(tmp_path: Path) -> None:
    """Two runs over HTTP (the first cut mid-download, leaving .part/.part.json; the
    second completes, the third finds the state by its hashed names): the secrets of the
    source URLs appear in no file of the state folder or the output, and every state file
    is mode 0600 in a 0700 folder."""
    import subprocess
    import sys

    from tests.conftest import write_trips_csv
    from tests.http_server import Stall, serve_folder_in_thread

    data = tmp_path / "data"
    data.mkdir()
    write_trips_csv(data / "t.csv", rows=3000, seed=1)
    write_trips_csv(data / "u.csv", rows=50, seed=2)
    base, stop = serve_folder_in_thread(data, {"t.csv": [Stall(after_bytes=8192), Stall(after_bytes=8192)]})
    secrets = ("pw-sekrit-1", "tok-sekrit-2", "tok-sekrit-3")
    try:
        host = base.removeprefix("http://")
        urls = [f"http://alice:{secrets[0]}@{host}/t.csv?token={secrets[1]}", f"{base}/u.csv?x=1&api_key={secrets[2]}"]
        job_file = tmp_path / "job.toml"
        job_file.write_text(
            f"""
[job]
name = "secret"
state_dir = "state"
[sources]
urls = {json.dumps(urls)}
[download]
retry = {{attempts = 1}}
timeout = {{read = 1}}
[transform]
executor = "thread"
on_error = "quarantine"
steps = [{{op = "cast", columns = {{fare = "float64"}}}}]
[output]
path = "out"
"""
        )
        run = [
            sys.executable,
            str(Path(__file__).resolve().parents[2] / "run.py"),
            "--config",
            str(job_file),
            "--quiet",
        ]
        codes = [subprocess.run(run, capture_output=True, text=True, timeout=120).returncode]
        # the cut download's resume validators, read before the next run resumes and removes them
        part_json = [p.read_text() for p in (tmp_path / "state").rglob("*.part.json")]
        codes += [subprocess.run(run, capture_output=True, text=True, timeout=120).returncode for _ in range(2)]
    finally:
        stop()
    assert codes[0] == 1 and codes[1] in (0, 3) and codes[2] in (0, 3), codes
    assert part_json and '"url": "http://***@' in part_json[0]
    assert not any(secret in text for text in part_json for secret in secrets)
    state = tmp_path / "state" / "secret"
    files = [p for p in (tmp_path / "state").rglob("*") if p.is_file()] + [
        p for p in (tmp_path / "out").rglob("*") if p.is_file()
    ]
    assert any(p.name == "manifest.json" for p in files) and any(p.name == "sources.json" for p in files)
    for path in files:
        raw = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in raw, f"{secret} in clear in {path}"
    manifest = json.loads((state / "manifest.json").read_text())
    assert len(manifest["sources"]) == 2 and all("#hmac=" in url for url in manifest["sources"])
    last = json.loads(sorted((state / "reports").glob("run-*.json"))[-1].read_text())
    assert [s["status"] for s in last["sources"]] == ["unchanged", "unchanged"]  # found again by hashed name
    assert state.stat().st_mode & 0o777 == 0o700
    for name in ("manifest.json", "sources.json", "url.key", "lock"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name

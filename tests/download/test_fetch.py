"""Fetching one source (``etl.download.fetch``), through the download stage, against a real HTTP
server on 127.0.0.1 with scripted faults: retries, resume, checksums, conditional GETs, secrets."""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from etl.core.config import DownloadConfig, Retry, Timeout
from etl.core.errors import ChecksumMismatch
from etl.core.queues import BoundedQueue
from etl.core.records import Source, StagedFile
from etl.core.redact import redact_url
from etl.download.fetch import parse_retry_after
from etl.download.stage import download_stage
from tests.download.runs import FAST, fails, payload, remote, retry_records, run, sha
from tests.http_server import (
    Drop,
    Mutate,
    RangeFrom,
    ScriptedServer,
    Stall,
    Status,
    serve_folder_in_thread,
)

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------------- retries


async def test_two_503s_then_success_takes_exactly_three_requests(site: Path, staging: Path) -> None:
    data = payload(50_000)
    (site / "a.csv").write_bytes(data)
    async with ScriptedServer(site, {"a.csv": [Status(503), Status(503)]}) as srv:
        stats, staged = await run([remote(srv.url("a.csv"), "a.csv")], staging)
    assert [h.status for h in srv.hits_for("a.csv")] == [503, 503, 200]
    assert [s.path for s in staged] == [staging / "a.csv"]
    assert (staging / "a.csv").read_bytes() == data
    assert stats.retries == 2 and stats.files == 1
    assert sorted(p.name for p in staging.iterdir()) == ["a.csv"]  # no .part, no .part.json left


async def test_404_fails_after_one_request_naming_url_and_status(site: Path, staging: Path) -> None:
    async with ScriptedServer(site) as srv:
        err, out = await fails([remote(srv.url("missing.csv"), "missing.csv")], staging)
    assert len(srv.hits) == 1
    assert err.status == 404 and err.attempts == 1 and not err.retryable
    assert srv.url("missing.csv") in str(err) and "HTTP 404" in str(err)
    assert len(out) == 0


async def test_retries_give_up_naming_last_status_and_attempt_count(site: Path, staging: Path) -> None:
    (site / "a.csv").write_bytes(b"x")
    cfg = FAST.model_copy(update={"retry": Retry(attempts=3, backoff=0.01, backoff_max=0.02)})
    async with ScriptedServer(site, {"a.csv": [Status(500)] * 5}) as srv:
        err, _ = await fails([remote(srv.url("a.csv"), "a.csv")], staging, cfg)
    assert len(srv.hits) == 3
    assert err.attempts == 3 and err.status == 500
    assert "gave up after 3 attempts" in str(err) and "HTTP 500" in str(err)


async def test_retry_after_seconds_is_the_backoff_used(
    site: Path, staging: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (site / "a.csv").write_bytes(b"id\n1\n")
    cfg = FAST.model_copy(update={"retry": Retry(backoff=0.01, backoff_max=5)})
    caplog.set_level(logging.INFO, "etl.download")
    async with ScriptedServer(site, {"a.csv": [Status(429, {"Retry-After": "1"})]}) as srv:
        await run([remote(srv.url("a.csv"), "a.csv")], staging, cfg)
    [rec] = retry_records(caplog)
    assert rec.delay == 1.0 and rec.attempt == 1 and "HTTP 429" in rec.reason  # type: ignore[attr-defined]
    assert rec.stage == "download" and rec.source == "a.csv"  # type: ignore[attr-defined]


async def test_retry_after_http_date_is_capped_at_backoff_max(
    site: Path, staging: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (site / "a.csv").write_bytes(b"id\n1\n")
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    caplog.set_level(logging.INFO, "etl.download")
    async with ScriptedServer(site, {"a.csv": [Status(503, {"Retry-After": later})]}) as srv:
        await run([remote(srv.url("a.csv"), "a.csv")], staging)
    assert [r.delay for r in retry_records(caplog)] == [FAST.retry.backoff_max]  # type: ignore[attr-defined]


def test_parse_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # in the past: go now
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_stalled_body_times_out_then_resumes(site: Path, staging: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = payload(20_000)
    (site / "a.csv").write_bytes(data)
    cfg = FAST.model_copy(update={"timeout": Timeout(connect=2, read=0.2, total=20)})
    caplog.set_level(logging.INFO, "etl.download")
    async with ScriptedServer(site, {"a.csv": [Stall(after_bytes=1000)]}) as srv:
        stats, _ = await run([remote(srv.url("a.csv"), "a.csv")], staging, cfg)
    first, second = srv.hits_for("a.csv")
    assert first.body_bytes == 1000
    assert second.headers["Range"] == "bytes=1000-" and second.status == 206
    assert (staging / "a.csv").read_bytes() == data
    assert "read timed out" in retry_records(caplog)[0].reason  # type: ignore[attr-defined]
    assert stats.resumed_bytes == 1000


async def test_connection_refused_is_retried_then_reported(staging: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = FAST.model_copy(update={"retry": Retry(attempts=2, backoff=0.01, backoff_max=0.01)})
    err, _ = await fails([remote(f"http://127.0.0.1:{port}/a.csv", "a.csv")], staging, cfg)
    assert err.attempts == 2 and err.retryable
    assert "gave up after 2 attempts" in str(err) and f"127.0.0.1:{port}/a.csv" in str(err)


async def test_total_timeout_bounds_a_file_across_attempts(site: Path, staging: Path) -> None:
    (site / "a.csv").write_bytes(payload(5000))
    cfg = FAST.model_copy(update={"timeout": Timeout(connect=2, read=5, total=0.3)})
    async with ScriptedServer(site, {"a.csv": [Stall(after_bytes=100)]}) as srv:
        err, _ = await fails([remote(srv.url("a.csv"), "a.csv")], staging, cfg)
    assert "download.timeout.total = 0.3s" in str(err)


# -------------------------------------------------------------------------- resume


async def test_dropped_connection_resumes_with_range_and_if_range(site: Path, staging: Path) -> None:
    data = payload(200_000)
    (site / "a.csv").write_bytes(data)
    async with ScriptedServer(site, {"a.csv": [Drop(0.5)]}) as srv:
        stats, [staged] = await run([remote(srv.url("a.csv"), "a.csv", sha256=sha(data))], staging)
    first, second = srv.hits_for("a.csv")
    start = range_start(second.headers)
    assert first.body_bytes == 100_000 and 0 < start <= 100_000
    assert second.headers["If-Range"] == first_etag(data)
    assert second.status == 206 and second.body_bytes == len(data) - start
    assert sha(staged.path.read_bytes()) == sha(data) and staged.size == len(data)
    assert stats.resumed_bytes == start


def range_start(headers: dict[str, str]) -> int:
    """N of ``Range: bytes=N-``: the bytes the client had staged (it may lose a few it had
    buffered but not read when the connection broke, never more than were sent)."""
    value = headers["Range"]
    assert value.startswith("bytes=") and value.endswith("-"), value
    return int(value[len("bytes=") : -1])


def first_etag(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()[:16]}"'  # how ScriptedServer makes ETags


async def test_file_changed_between_attempts_restarts_instead_of_appending(site: Path, staging: Path) -> None:
    old, new = payload(100_000, seed=1), payload(120_000, seed=2)
    (site / "a.csv").write_bytes(old)
    async with ScriptedServer(site, {"a.csv": [Drop(0.5), Mutate(new)]}) as srv:
        stats, [staged] = await run([remote(srv.url("a.csv"), "a.csv")], staging)
    first, second = srv.hits_for("a.csv")
    assert 0 < range_start(second.headers) <= first.body_bytes
    assert second.status == 200  # the If-Range validator no longer matched
    assert staged.path.read_bytes() == new
    assert stats.resumed_bytes == 0


async def test_part_file_from_a_failed_run_is_resumed_by_the_next_run(site: Path, staging: Path) -> None:
    data = payload(80_000)
    (site / "a.csv").write_bytes(data)
    once = FAST.model_copy(update={"retry": Retry(attempts=1)})
    async with ScriptedServer(site, {"a.csv": [Drop(0.25)]}) as srv:
        await fails([remote(srv.url("a.csv"), "a.csv")], staging, once)
        kept = (staging / "a.csv.part").stat().st_size
        _, [staged] = await run([remote(srv.url("a.csv"), "a.csv")], staging)
    assert 0 < kept <= 20_000
    assert range_start(srv.hits_for("a.csv")[1].headers) == kept
    assert staged.path.read_bytes() == data


async def leave_a_part(srv: ScriptedServer, staging: Path, name: str = "a.csv") -> int:
    """A run that fails (one attempt, the body cut at half by a scripted ``Drop``) leaves a
    ``.part`` and its validators behind; returns the bytes it kept."""
    await fails([remote(srv.url(name), name)], staging, ONCE)
    return (staging / f"{name}.part").stat().st_size


ONCE = FAST.model_copy(update={"retry": Retry(attempts=1)})  # a restart must not need a retry


@pytest.mark.parametrize("served_from", [1000, 90_000], ids=["before", "after"])
async def test_content_range_elsewhere_than_asked_restarts_from_byte_0_never_splicing(
    site: Path, staging: Path, served_from: int
) -> None:
    data = payload(100_000)
    (site / "a.csv").write_bytes(data)
    async with ScriptedServer(site, {"a.csv": [Drop(0.5), RangeFrom(served_from)]}) as srv:
        kept = await leave_a_part(srv, staging)
        stats, [staged] = await run([remote(srv.url("a.csv"), "a.csv")], staging, ONCE)
    _, wrong, fresh = srv.hits_for("a.csv")
    assert 0 < kept <= 50_000 and range_start(wrong.headers) == kept
    assert wrong.status == 206 and wrong.body_bytes < len(data)  # bytes {served_from}-, not {kept}-
    assert "Range" not in fresh.headers and fresh.status == 200
    assert staged.path.read_bytes() == data and staged.size == len(data)
    assert stats.resumed_bytes == 0 and stats.retries == 0
    assert sorted(p.name for p in staging.iterdir()) == ["a.csv"]


async def test_206_from_byte_0_to_a_range_request_is_taken_as_the_whole_file(site: Path, staging: Path) -> None:
    data = payload(100_000)
    (site / "a.csv").write_bytes(data)
    async with ScriptedServer(site, {"a.csv": [Drop(0.5), RangeFrom(0)]}) as srv:
        kept = await leave_a_part(srv, staging)
        stats, [staged] = await run([remote(srv.url("a.csv"), "a.csv", sha256=sha(data))], staging, ONCE)
    _, whole = srv.hits_for("a.csv")  # no third request: that answer was the file
    assert range_start(whole.headers) == kept and whole.status == 206 and whole.body_bytes == len(data)
    assert staged.path.read_bytes() == data and stats.resumed_bytes == 0


async def test_416_for_a_stale_part_restarts_from_byte_0(site: Path, staging: Path) -> None:
    data = payload(100_000)
    (site / "a.csv").write_bytes(data)
    unsatisfiable = Status(416, {"Content-Range": f"bytes */{len(data)}"})
    async with ScriptedServer(site, {"a.csv": [Drop(0.5), unsatisfiable]}) as srv:
        kept = await leave_a_part(srv, staging)
        stats, [staged] = await run([remote(srv.url("a.csv"), "a.csv")], staging, ONCE)
    _, refused, fresh = srv.hits_for("a.csv")
    assert range_start(refused.headers) == kept and refused.status == 416
    assert "Range" not in fresh.headers and fresh.status == 200
    assert staged.path.read_bytes() == data and stats.resumed_bytes == 0
    assert sorted(p.name for p in staging.iterdir()) == ["a.csv"]


@pytest.mark.parametrize(
    ("checksum", "tail", "refetched"),
    [
        (True, "right", False),  # the run died between the last byte and the rename
        (False, "right", True),  # complete, most likely, but nothing can tell
        (True, "wrong", True),  # as long as the file, wrong bytes: never published
    ],
)
async def test_416_for_a_part_as_long_as_the_file_publishes_it_only_when_the_checksum_says_so(
    site: Path, staging: Path, tmp_path: Path, checksum: bool, tail: str, refetched: bool
) -> None:
    data = payload(100_000)
    (site / "a.csv").write_bytes(data)
    state = tmp_path / "sources.json"
    async with ScriptedServer(site, {"a.csv": [Drop(0.5)]}) as srv:
        kept = await leave_a_part(srv, staging)
        rest = data[kept:] if tail == "right" else bytes(len(data) - kept)
        part = staging / "a.csv.part"
        part.write_bytes(part.read_bytes() + rest)  # as if the rest had arrived
        src = remote(srv.url("a.csv"), "a.csv", sha256=sha(data) if checksum else None)
        stats, [staged] = await run([src], staging, ONCE, state_file=state)
        _, [again] = await run([src], staging, ONCE, state_file=state)
    hits = srv.hits_for("a.csv")
    assert range_start(hits[1].headers) == len(data) and hits[1].status == 416  # the server's own 416
    assert [h.status for h in hits[2:]] == ([200] if refetched else []) + [304]
    assert staged.path.read_bytes() == data and staged.size == len(data)
    assert stats.bytes == (len(data) if refetched else 0)
    assert again.unchanged  # the validators were kept: the next run asks If-None-Match
    assert json.loads(state.read_text())["files"][src.url]["etag"] == first_etag(data)
    assert sorted(p.name for p in staging.iterdir()) == ["a.csv"]


# ----------------------------------------------------------------------- integrity


async def test_wrong_checksum_is_retried_then_fails_leaving_nothing(site: Path, staging: Path) -> None:
    data = payload(30_000)
    (site / "a.csv").write_bytes(data)
    wrong = "0" * 64
    cfg = FAST.model_copy(update={"retry": Retry(attempts=3, backoff=0.01, backoff_max=0.01)})
    async with ScriptedServer(site) as srv:
        err, out = await fails([remote(srv.url("a.csv"), "a.csv", sha256=wrong)], staging, cfg)
    assert isinstance(err, ChecksumMismatch)
    assert wrong in str(err) and sha(data) in str(err) and err.attempts == 3
    assert len(srv.hits) == 3
    assert list(staging.iterdir()) == []
    assert len(out) == 0


async def test_md5_is_verified_too(site: Path, staging: Path) -> None:
    data = payload(1000)
    (site / "a.csv").write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    async with ScriptedServer(site) as srv:
        _, [staged] = await run([remote(srv.url("a.csv"), "a.csv", md5=md5)], staging)
        err, _ = await fails(
            [remote(srv.url("a.csv"), "b.csv", md5="f" * 32)],
            staging,
            FAST.model_copy(update={"retry": Retry(attempts=1)}),
        )
    assert staged.path.read_bytes() == data
    assert "md5 mismatch" in str(err) and md5 in str(err)


async def test_local_source_with_wrong_checksum_fails(tmp_path: Path, staging: Path) -> None:
    local = tmp_path / "local.csv"
    local.write_bytes(b"id\n1\n")
    err, out = await fails([Source(0, str(local), "local.csv", "csv", sha256="a" * 64)], staging)
    assert isinstance(err, ChecksumMismatch) and str(local) in str(err) and len(out) == 0


async def test_a_fetched_file_carries_the_sha256_computed_while_it_arrived(tmp_path: Path) -> None:
    """The run's bookkeeping uses this hash instead of reading the staged file again."""
    body = os.urandom(300_000)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "f.bin").write_bytes(body)
    base, stop = serve_folder_in_thread(tmp_path / "srv")
    try:
        out: BoundedQueue[StagedFile] = BoundedQueue("files", 4, 1 << 30)
        src = Source(0, f"{base}/f.bin", "f.bin", "csv")
        await download_stage([src], DownloadConfig(), tmp_path / "staging", out)
        staged = await out.get()
    finally:
        stop()
    assert staged is not None and staged.sha256 == hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------- incremental


async def test_rerun_gets_304_and_fetches_no_body(site: Path, staging: Path, tmp_path: Path) -> None:
    data = payload(40_000)
    (site / "a.csv").write_bytes(data)
    state = tmp_path / "state" / "sources.json"
    async with ScriptedServer(site) as srv:
        src = remote(srv.url("a.csv"), "a.csv", sha256=sha(data))
        await run([src], staging, state_file=state)
        before = srv.body_bytes
        stats, [staged] = await run([src], staging, state_file=state)
        assert srv.body_bytes == before  # not one body byte the second time
        stats_full, [full] = await run([src], staging, state_file=state, full_refresh=True)
    first, second, third = srv.hits_for("a.csv")
    assert second.headers["If-None-Match"] == first_etag(data) and second.status == 304
    assert staged.unchanged and staged.path == staging / "a.csv" and staged.size == len(data)
    assert stats.not_modified == 1 and stats.bytes == 0
    assert "If-None-Match" not in third.headers and third.status == 200 and not full.unchanged
    assert stats_full.bytes == len(data)
    entry = json.loads(state.read_text())["files"][src.url]
    assert entry["etag"] == first_etag(data) and entry["size"] == len(data) and entry["sha256"] == sha(data)
    mtime = int((site / "a.csv").stat().st_mtime)
    assert entry["last_modified"] == email.utils.formatdate(mtime, usegmt=True)
    assert not list(state.parent.glob(".*.tmp"))  # written through a temp file, then replaced


async def test_no_conditional_request_when_the_staged_copy_is_gone(site: Path, staging: Path, tmp_path: Path) -> None:
    (site / "a.csv").write_bytes(payload(1000))
    state = tmp_path / "sources.json"
    async with ScriptedServer(site) as srv:
        src = remote(srv.url("a.csv"), "a.csv")
        await run([src], staging, state_file=state)
        (staging / "a.csv").unlink()
        _, [staged] = await run([src], staging, state_file=state)
    assert "If-None-Match" not in srv.hits[1].headers and not staged.unchanged
    assert staged.path.read_bytes() == payload(1000)


# ----------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("userinfo", "headers"),
    [
        ("", {"Authorization": "Bearer sekrit-token-1", "X-Session-Token": "tok-value-2"}),
        ("alice:pa55word@", {"X-Api-Key": "k3y-header-3", "Cookie": "sid=c00kie-4"}),
    ],
)
async def test_secrets_never_reach_errors_or_logs(
    site: Path, staging: Path, caplog: pytest.LogCaptureFixture, userinfo: str, headers: dict[str, str]
) -> None:
    caplog.set_level(logging.DEBUG, "etl.download")
    cfg = FAST.model_copy(update={"headers": dict(list(headers.items())[:1])})
    async with ScriptedServer(site, {"x.csv": [Status(503)]}) as srv:
        url = srv.url("x.csv").replace("http://", f"http://{userinfo}") + "?api_key=k3y-value"
        src = remote(url, "x.csv", headers=tuple(headers.items())[1:])
        err, _ = await fails([src], staging, cfg)
    sent = srv.hits[0].headers
    assert all(sent[k] == v for k, v in headers.items())  # global and per-source headers both sent
    text = str(err) + "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    for secret in [*headers.values(), "pa55word", "alice", "k3y-value"]:
        assert secret.split("=")[-1] not in text
    assert "api_key=***" in str(err) and "x.csv" in str(err)
    assert ("***@127.0.0.1" in str(err)) == bool(userinfo)


def test_redact_url_hides_userinfo_and_secret_query_values() -> None:
    redacted = redact_url("https://u:p@h.example/a.csv?x=1&token=abc")
    assert redacted == "https://***@h.example/a.csv?x=1&token=***"
    assert redact_url("https://h.example/a.csv?page=2") == "https://h.example/a.csv?page=2"

"""The download state file: per-URL validators, loaded leniently, saved atomically, throttled."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import etl.download.source_state as source_state
from etl.download.source_state import SourceState

ENTRY = {
    "name": "a.csv",
    "etag": '"abc"',
    "last_modified": "Wed, 01 Jan 2026 00:00:00 GMT",
    "size": 10,
    "sha256": "0" * 64,
}


def test_no_path_or_no_file_gives_an_empty_state_without_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert SourceState.load(None).entries == {}
        missing = SourceState.load(tmp_path / "sources.json")
    assert missing.entries == {} and missing.path == tmp_path / "sources.json"
    assert caplog.records == []


@pytest.mark.parametrize(
    "content", [b'{"version": 1, "files": {', b"[1, 2]", b'{"version": 1}', b"\xff\xfe\x00", b'"just a string"']
)
def test_unreadable_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "sources.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="etl.download"):
        state = SourceState.load(path)
    assert state.entries == {} and state.path == path
    assert any("sources.json" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_folder_in_place_of_the_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "sources.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="etl.download"):
        assert SourceState.load(tmp_path / "sources.json").entries == {}
    assert "unreadable" in caplog.text


async def test_save_then_load_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state" / "job" / "sources.json"  # folders are created
    state = SourceState(path, {"https://h/a.csv": dict(ENTRY), "https://h/b.csv": dict(ENTRY, name="b.csv")})
    await state.save()
    assert SourceState.load(path).entries == state.entries
    on_disk = json.loads(path.read_text())
    assert on_disk["version"] == 1 and set(on_disk["files"]) == {"https://h/a.csv", "https://h/b.csv"}


async def test_save_keeps_only_the_listed_urls(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    state = SourceState(path, {"u1": dict(ENTRY), "u2": dict(ENTRY), "u3": dict(ENTRY)})
    await state.save(keep={"u1", "u3", "not-there"})
    assert set(SourceState.load(path).entries) == {"u1", "u3"}
    assert set(state.entries) == {"u1", "u2", "u3"}  # the in-memory entries are untouched


async def test_save_without_a_path_writes_nothing(tmp_path: Path) -> None:
    await SourceState(None, {"u": dict(ENTRY)}).save()
    assert list(tmp_path.iterdir()) == []


async def test_save_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"version": 1, "files": {"old": ENTRY}}))
    before = path.stat().st_ino
    state = SourceState.load(path)
    state.entries = {"new": dict(ENTRY)}
    await state.save()
    assert set(SourceState.load(path).entries) == {"new"}
    assert path.stat().st_ino != before  # a new file renamed over the old one, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sources.json", "url.key"]


async def test_a_save_that_fails_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    state = SourceState(path, {"u": dict(ENTRY)})
    await state.save()
    loop: dict = {}
    loop["self"] = loop  # cannot be serialised
    state.entries["v"] = loop
    with pytest.raises(ValueError):
        await state.save()
    assert json.loads(path.read_text()) == {"version": 1, "files": {"u": ENTRY}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sources.json"]


async def test_throttled_save_is_skipped_within_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    state = SourceState(path, {"u": dict(ENTRY)})
    await state.save(throttle=True)  # just created: the interval has not passed
    assert not path.exists()
    await state.save()  # unthrottled saves always write
    assert path.exists()
    state.entries["v"] = dict(ENTRY)
    await state.save(throttle=True)  # just saved: skipped again
    assert set(SourceState.load(path).entries) == {"u"}


async def test_throttled_save_writes_once_the_interval_has_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sources.json"
    state = SourceState(path, {"u": dict(ENTRY)})
    monkeypatch.setattr(source_state, "STATE_SAVE_SECONDS", 0.0)  # every interval has passed
    await state.save(throttle=True)
    assert set(SourceState.load(path).entries) == {"u"}


async def test_urls_with_secrets_are_stored_redacted_with_a_keyed_hash_and_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sources.json"
    a, b = "https://u:pw-111@h.example/a.csv?token=tok-222", "https://u:pw-111@h.example/a.csv?token=tok-333"
    # a file of an older version named them in clear: re-keyed on load
    path.write_text(json.dumps({"version": 1, "files": {a: dict(ENTRY), "https://h.example/plain.csv": dict(ENTRY)}}))
    state = SourceState.load(path)
    state.entries[state.ident(b)] = dict(ENTRY, size=9)
    await state.save(keep={a, b, "https://h.example/plain.csv"})
    text = path.read_text()
    assert "pw-111" not in text and "tok-222" not in text and "tok-333" not in text
    names = sorted(json.loads(text)["files"])
    assert len(names) == 3 and "https://h.example/plain.csv" in names  # no secret: kept as it was
    assert all(n.startswith("https://***@h.example/a.csv?token=***#hmac=") for n in names[:2] if "***" in n)
    again = SourceState.load(path)
    assert again.entries[again.ident(a)]["size"] == ENTRY["size"] and again.entries[again.ident(b)]["size"] == 9
    assert path.stat().st_mode & 0o777 == 0o600 and (tmp_path / "url.key").stat().st_mode & 0o777 == 0o600

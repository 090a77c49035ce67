"""Logging set-up: readable text lines, or one JSON object per line with run id, stage and source."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from etl.ops.logs import JsonFormatter, TextFormatter, setup_logging

JSON_KEYS = {"time", "level", "stage", "source", "message", "run_id", "logger"}


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    aiohttp_level = logging.getLogger("aiohttp").level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp").setLevel(aiohttp_level)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_json_log_file_has_one_valid_object_per_line(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "run.log"  # its folder is created
    setup_logging("INFO", "json", log_file, run_id="20260101T000000-abc123")
    log = logging.getLogger("etl.download")
    log.info("fetched %d bytes", 42, extra={"stage": "download", "source": "trips-1.csv.gz"})
    log.warning('multi\nline "quoted" Ünïcode', extra={"stage": "read"})
    logging.getLogger("etl.run").info("no extras")
    logging.getLogger("etl.run").debug("below the level")
    got = [json.loads(line) for line in lines(log_file)]
    assert len(got) == 3
    assert log_file.stat().st_mode & 0o777 == 0o600  # a new log file: readable by the owner only
    for entry in got:
        assert set(entry) == JSON_KEYS and entry["run_id"] == "20260101T000000-abc123"
    assert got[0] | {"time": None} == {
        "time": None,
        "level": "INFO",
        "stage": "download",
        "source": "trips-1.csv.gz",
        "message": "fetched 42 bytes",
        "run_id": "20260101T000000-abc123",
        "logger": "etl.download",
    }
    assert got[1]["message"] == 'multi\nline "quoted" Ünïcode' and got[1]["level"] == "WARNING"
    assert got[1]["stage"] == "read" and got[1]["source"] == ""
    assert got[2]["stage"] == "" and got[2]["source"] == "" and got[2]["logger"] == "etl.run"


def test_json_time_is_utc_iso_with_milliseconds(tmp_path: Path) -> None:
    setup_logging("INFO", "json", tmp_path / "run.log", run_id="r")
    logging.getLogger("etl").info("x")
    (entry,) = [json.loads(line) for line in lines(tmp_path / "run.log")]
    assert entry["time"].endswith("+00:00") and len(entry["time"].split(".")[1]) == len("123+00:00")


def test_json_exception_carries_its_traceback_on_the_same_line(tmp_path: Path) -> None:
    setup_logging("INFO", "json", tmp_path / "run.log", run_id="r")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("etl").exception("failed", extra={"stage": "write"})
    (line,) = lines(tmp_path / "run.log")
    entry = json.loads(line)
    assert entry["message"] == "failed" and "ValueError: boom" in entry["traceback"]


def test_text_format_names_stage_and_source(tmp_path: Path) -> None:
    setup_logging("INFO", "text", tmp_path / "run.log", run_id="r")
    logging.getLogger("etl.download").info("fetched", extra={"stage": "download", "source": "a.csv"})
    logging.getLogger("etl").warning("plain")
    first, second = lines(tmp_path / "run.log")
    assert first.endswith("INFO    [download] a.csv: fetched")
    assert second.endswith("WARNING plain")
    assert first[:4].isdigit() and first[4] == "-"  # starts with the time
    assert not first.lstrip().startswith("{")


def test_level_filters_records_and_aiohttp_is_quietened(tmp_path: Path) -> None:
    setup_logging("WARNING", "text", tmp_path / "run.log", run_id="r")
    logging.getLogger("etl").info("hidden")
    logging.getLogger("etl").error("shown")
    assert [line.split()[-1] for line in lines(tmp_path / "run.log")] == ["shown"]
    assert logging.getLogger("aiohttp").level == logging.WARNING


def test_setup_replaces_earlier_handlers(tmp_path: Path) -> None:
    setup_logging("INFO", "json", tmp_path / "first.log", run_id="one")
    setup_logging("INFO", "json", tmp_path / "second.log", run_id="two")
    logging.getLogger("etl").info("once")
    assert lines(tmp_path / "first.log") == []
    (line,) = lines(tmp_path / "second.log")
    assert json.loads(line)["run_id"] == "two"


def test_default_handler_writes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json", None, run_id="r")
    logging.getLogger("etl").info("to stderr", extra={"source": "s"})
    err = capsys.readouterr().err
    entry = json.loads(err.strip().splitlines()[-1])
    assert entry["message"] == "to stderr" and entry["source"] == "s"


def test_formatters_on_records_built_by_hand() -> None:
    record = logging.LogRecord("etl.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.stage, record.source, record.run_id = "transform", "b.csv", "rid"
    assert json.loads(JsonFormatter().format(record))["message"] == "hello world"
    assert TextFormatter().format(record).endswith("[transform] b.csv: hello world")


def test_json_keeps_every_extra_field(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    setup_logging("INFO", "json", log_file, run_id="r1")
    logging.getLogger("etl.download").warning(
        "retry %s in %.2fs",
        "http://h/a.csv",
        0.5,
        extra={
            "stage": "download",
            "source": "a.csv",
            "url": "http://h/a.csv",
            "attempt": 2,
            "delay": 0.5,
            "reason": "HTTP 503",
            "summary": {"rows_in": 10, "stage_seconds": {"read": 0.1}},
            "level": "not the level",  # would shadow a core key
            "path": Path("/x/y"),  # JSON cannot hold it: written as its str
        },
    )
    (entry,) = [json.loads(line) for line in lines(log_file)]
    assert entry["level"] == "WARNING" and entry["extra_level"] == "not the level"
    assert entry["url"] == "http://h/a.csv" and entry["attempt"] == 2
    assert entry["delay"] == 0.5 and entry["reason"] == "HTTP 503"
    assert entry["summary"] == {"rows_in": 10, "stage_seconds": {"read": 0.1}}
    assert entry["path"] == "/x/y"
    assert set(entry) == JSON_KEYS | {"url", "attempt", "delay", "reason", "summary", "extra_level", "path"}

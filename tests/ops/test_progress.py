"""Progress: plain periodic lines when stderr is not a terminal, nothing when quiet, exact counts."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

import etl.ops.progress as progress_mod
from etl.ops.progress import Progress, StageProgress, choose_mode

THREADS, UPDATES = 8, 2000


def test_mode_follows_quiet_and_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert choose_mode(quiet=True) == "off"
    assert not sys.stderr.isatty()  # captured by pytest
    assert choose_mode(quiet=False) == "log"


def test_log_mode_writes_plain_lines_without_control_characters(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)  # every update is due for a line
    p = Progress("log")
    read = p.stage("read", "chunks", total=4)
    with caplog.at_level(logging.INFO, logger="etl.progress"):
        for _ in range(4):
            read.update(items=1, nbytes=3 << 20)
    p.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "etl.progress"]
    assert len(msgs) == 4
    assert msgs[-1].startswith("read: 4/4 chunks, 12.0 MiB at ")
    assert all(r.stage == "read" for r in caplog.records if r.name == "etl.progress")
    out = capsys.readouterr()
    for text in msgs + [out.err, out.out]:
        assert "\r" not in text and "\x1b" not in text
    assert out.err == ""  # no bar drawn


def test_log_mode_is_rate_limited_to_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    p = Progress("log")
    sp = p.stage("write", "parts")
    with caplog.at_level(logging.INFO, logger="etl.progress"):
        for _ in range(1000):
            sp.update(items=1)
    assert [r for r in caplog.records if r.name == "etl.progress"] == []  # within the first 10 s
    assert sp.items == 1000


def test_line_without_total_or_bytes() -> None:
    sp = StageProgress("transform", "rows", None, "off", 0)
    sp.update(items=5)
    assert sp.line() == "transform: 5 rows"
    sp.update(nbytes=2048)
    assert sp.line().startswith("transform: 5 rows, 2.0 KiB at ")


def test_quiet_mode_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)
    p = Progress(choose_mode(quiet=True))
    with caplog.at_level(logging.DEBUG):
        for name in ("download", "read", "transform", "write"):
            sp = p.stage(name, "items", total=10)
            for _ in range(10):
                sp.update(items=1, nbytes=100)
        p.close()
    assert caplog.records == []
    assert capsys.readouterr() == ("", "")
    assert sp.items == 10 and sp.nbytes == 1000  # still counted


def test_updates_from_many_threads_count_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)  # the logging branch runs under the lock too
    for mode in ("off", "log"):
        sp = Progress(mode).stage("read", "chunks")  # type: ignore[arg-type]
        start = threading.Barrier(THREADS)

        def work(sp: StageProgress = sp, start: threading.Barrier = start) -> None:
            start.wait()
            for _ in range(UPDATES):
                sp.update(items=1, nbytes=3)

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        logging.getLogger("etl.progress").disabled = True  # count, do not print 16,000 lines
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            logging.getLogger("etl.progress").disabled = False
        assert (sp.items, sp.nbytes) == (THREADS * UPDATES, 3 * THREADS * UPDATES)


def test_bar_mode_draws_a_bar_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress("bar")
    sp = p.stage("download", "files", total=2)
    sp.update(items=2, nbytes=1024)
    p.close()
    err = capsys.readouterr().err
    assert "download" in err and "2/2" in err


def test_bar_mode_sends_terminal_log_lines_through_tqdm(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before, level = root.handlers[:], root.level
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    root.handlers[:] = [console]
    root.setLevel(logging.INFO)
    try:
        p = Progress("bar")
        sp = p.stage("transform", "rows", total=10)
        sp.update(items=3)
        assert console not in root.handlers  # redirected while bars are drawn
        logging.getLogger("etl.state").info("manifest saved")
        sp.update(items=7)
        p.close()
        assert root.handlers == [console]  # and put back
    finally:
        root.handlers[:] = before
        root.setLevel(level)
    err = capsys.readouterr().err
    line = next(x for x in err.replace("\r", "\n").splitlines() if "manifest saved" in x)
    assert line == "LOG manifest saved"  # a line of its own, not glued to a bar


def test_bar_mode_leaves_a_log_file_alone(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = root.handlers[:]
    to_file = logging.FileHandler(tmp_path / "run.log")
    root.handlers[:] = [to_file]
    try:
        p = Progress("bar")
        assert root.handlers == [to_file]  # no extra handler writing to the terminal
        p.close()
    finally:
        to_file.close()
        root.handlers[:] = before

"""Progress: plain periodic lines when stderr is not a terminal, nothing when quiet, exact counts."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import etl.ops.progress as progress_mod
from etl.core.config import load_job
from etl.ops.progress import Progress, StageProgress, choose_mode
from etl.run.pipeline import Run, RunOptions
from tests.conftest import write_trips_csv
from tests.http_server import Gate, Mutate, ScriptedServer, serve_folder_in_thread

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


# ------------------------------------------------------- byte bars (read, transform)


def test_byte_bar_total_grows_then_settles_and_the_line_shows_share_and_eta() -> None:
    sp = StageProgress("read", "chunks", None, "off", 0, by_bytes=True)
    sp.expect(3 << 20)
    sp.update(items=1, nbytes=1 << 20)
    assert sp.line().startswith("read: 1.0 MiB of 3.0 MiB so far (downloads running) (33%, ETA ")
    sp.expect(1 << 20)  # another file staged
    sp.settle()
    sp.update(items=1, nbytes=1 << 20)
    line = sp.line()
    assert line.startswith("read: 2.0 MiB of 4.0 MiB (50%, ETA ") and ", 2 chunks, at " in line
    sp.expect(-(1 << 20))  # a file the run skips leaves the total
    sp.update(items=1, nbytes=1 << 20)
    assert (sp.nbytes, sp.total) == (3 << 20, 3 << 20) and "(100%, ETA 0:00)" in sp.line()


def test_byte_bar_log_lines_carry_the_figures_as_fields(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)
    sp = Progress("log").stage("transform", "rows", by_bytes=True)
    sp.expect(1000)
    with caplog.at_level(logging.INFO, logger="etl.progress"):
        sp.update(items=40, nbytes=250)
    (record,) = [r for r in caplog.records if r.name == "etl.progress"]
    assert record.getMessage().startswith("transform: 250.0 B of 1000.0 B so far (downloads running) (25%")
    fields = {k: getattr(record, k) for k in ("stage", "done_bytes", "total_bytes", "total_final", "items")}
    assert fields == {"stage": "transform", "done_bytes": 250, "total_bytes": 1000, "total_final": False, "items": 40}


def test_byte_bar_draws_a_percentage(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress("bar")
    sp = p.stage("read", "chunks", by_bytes=True)
    sp.expect(4 << 20)
    sp.settle()
    for _ in range(4):
        sp.update(items=1, nbytes=1 << 20)
    p.close()
    err = capsys.readouterr().err
    assert "100%" in err and "4.00M/4.00M" in err and "4 chunks" in err


FORMATS = ("csv", "csv.gz", "jsonl", "parquet")


def _sources(folder: Path, fmt: str) -> list[Path]:
    """Three files of one format (a header-only CSV among the CSV ones: no chunk carries its bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(3):
        csv_path = folder / f"trips-{k}.csv"
        write_trips_csv(csv_path, rows=0 if (k == 2 and fmt.startswith("csv")) else 300 + 50 * k, seed=k)
        if fmt == "csv":
            paths.append(csv_path)
            continue
        path = folder / f"trips-{k}.{fmt}"
        if fmt == "csv.gz":
            path.write_bytes(gzip.compress(csv_path.read_bytes()))
        else:
            table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(column_types={"note": pa.string()}))
            if fmt == "parquet":
                pq.write_table(table, path, row_group_size=100)
            else:
                path.write_text("".join(json.dumps(r, default=str) + "\n" for r in table.to_pylist()))
        csv_path.unlink()
        paths.append(path)
    return paths


def _run(tmp_path: Path, urls: list[str], fmt: str) -> tuple[Run, int]:
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[job]
name = "bars"
state_dir = "state"

[sources]
urls = {json.dumps(urls)}
format = "{fmt.split(".")[0]}"

[read]
chunk_rows = 60

[transform]
executor = "serial"
steps = []

[output]
path = "out"
"""
    )
    run = Run(load_job(job), RunOptions(progress="off"))
    summary = asyncio.run(run.execute())
    return run, summary.rows_in


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_and_transform_bars_end_at_the_total_bytes(tmp_path: Path, fmt: str, where: str) -> None:
    paths = _sources(tmp_path / "data", fmt)
    size = sum(p.stat().st_size for p in paths)
    stop = None
    if where == "http":
        base, stop = serve_folder_in_thread(tmp_path / "data")
        urls = [f"{base}/{p.name}" for p in paths]
    else:
        urls = [str(p) for p in paths]
    try:
        run, rows_in = _run(tmp_path, urls, fmt)
    finally:
        if stop is not None:
            stop()
    for bar in (run.read_bar, run.transform_bar):
        assert (bar.nbytes, bar.total, bar.final) == (size, size, True), bar.stage
        assert "(100%" in bar.line()
    assert run.transform_bar.items == rows_in == (300 + 350 + (0 if fmt.startswith("csv") else 400))
    assert run.read_bar.items >= 2  # chunks


def test_bars_leave_out_the_files_a_rerun_skips(tmp_path: Path) -> None:
    paths = _sources(tmp_path / "data", "csv.gz")
    first, _ = _run(tmp_path, [str(p) for p in paths], "csv.gz")
    assert first.read_bar.total == sum(p.stat().st_size for p in paths)
    again, _ = _run(tmp_path, [str(p) for p in paths], "csv.gz")  # every source unchanged: skipped
    for bar in (again.read_bar, again.transform_bar):
        assert (bar.nbytes, bar.total) == (0, 0)


class _Watched(Progress):
    """Real bars that set ``known`` once the read bar's total reaches ``want`` bytes, and
    remember whether the total was final (``settle``) by then."""

    def __init__(self, want: int) -> None:
        super().__init__("off")
        self.want = want
        self.known = asyncio.Event()
        self.final_when_known: bool | None = None

    def stage(self, name: str, unit: str, total: int | None = None, *, by_bytes: bool = False) -> StageProgress:
        sp = super().stage(name, unit, total, by_bytes=by_bytes)
        if name == "read":
            watched, bar = self, sp
            expect = sp.expect

            def expect_and_watch(nbytes: int) -> None:
                expect(nbytes)
                if (bar.total or 0) >= watched.want and not watched.known.is_set():
                    watched.final_when_known = bar.final
                    watched.known.set()

            sp.expect = expect_and_watch  # type: ignore[method-assign]  # a real bar, watched
        return sp


@pytest.mark.parametrize(("rerun", "chunked"), [(False, False), (False, True), (True, True)])
def test_totals_come_from_content_length_before_any_download_ends(tmp_path: Path, rerun: bool, chunked: bool) -> None:
    """Every body is held by the server until the read bar's total equals the sum of the
    Content-Lengths: the total is known while no download has ended (none could), and final
    then when every file has one. A file sent chunked (no Content-Length) joins when staged;
    the final count equals the total. On a rerun, the unchanged files (304) leave the total
    and the changed one is counted once."""
    paths = _sources(tmp_path / "data", "csv.gz")
    sizes = [p.stat().st_size for p in paths]
    finals: list[bool | None] = []

    async def run_once(srv: ScriptedServer, release_after: int, sampled: bool) -> tuple[Run, bool]:
        watched = _Watched(release_after)
        gates = [Gate(watched.known, chunked=chunked and k == 2) for k in range(len(paths))]
        srv.scripts = {p.name: [gate] for p, gate in zip(paths, gates, strict=True)}
        if sampled:  # the planner samples the first source's head first (not a rerun: it has a staged copy)
            srv.scripts[paths[0].name].insert(0, Mutate(paths[0].read_bytes()))  # same bytes: served as is
        run = _job_run(tmp_path, [srv.url(p.name) for p in paths])
        run.progress = watched
        await run.execute()
        finals.append(watched.final_when_known)
        return run, watched.known.is_set() and not any(g.timed_out for g in gates)

    async def main() -> None:
        async with ScriptedServer(tmp_path / "data") as srv:
            early = sum(sizes) - (sizes[2] if chunked else 0)  # the chunked one cannot be known early
            run, known = await run_once(srv, early, sampled=True)
            assert known and finals == [not chunked]
            for bar in (run.read_bar, run.transform_bar):
                assert (bar.nbytes, bar.total, bar.final) == (sum(sizes), sum(sizes), True), bar.stage
            if not rerun:
                return
            paths[1].write_bytes(gzip.compress(b"id,note\n1,changed\n2,again\n"))
            sizes[1] = paths[1].stat().st_size
            run, known = await run_once(srv, sizes[1], sampled=False)
            assert known and run.summary.download["not_modified"] == 2
            for bar in (run.read_bar, run.transform_bar):
                assert (bar.nbytes, bar.total) == (sizes[1], sizes[1]), bar.stage

    asyncio.run(main())


def _job_run(tmp_path: Path, urls: list[str]) -> Run:
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[job]
name = "bars"
state_dir = "state"

[sources]
urls = {json.dumps(urls)}
format = "csv"

[read]
chunk_rows = 60

[transform]
executor = "serial"
steps = []

[output]
path = "out"
"""
    )
    return Run(load_job(job), RunOptions(progress="off"))

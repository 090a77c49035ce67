"""The transform benchmark at a tiny size: every engine runs and they all agree.

No timing is asserted (speed is what the benchmark prints); these tests check that the
benchmark measures what it says and that a wrong engine would be caught.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from tests.conftest import nginx_binary

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.engines import check_output, differences

ROWS, FILES = 20_000, 2


def expected_rows(data: Path) -> int:
    """The job's filter, computed straight from the CSVs with pyarrow (no engine involved)."""
    opts = pacsv.ConvertOptions(
        include_columns=["pickup_at", "dropoff_at", "trip_distance", "fare_amount"],
        column_types={"trip_distance": "string", "fare_amount": "string"},
        null_values=[""],
        strings_can_be_null=True,
    )
    parse = pacsv.ParseOptions(newlines_in_values=True)  # the notes hold quoted newlines
    kept = 0
    for path in sorted(data.glob("trips-*.csv.gz")):
        t = pacsv.read_csv(path, parse_options=parse, convert_options=opts)
        dist = pc.cast(pc.utf8_trim_whitespace(t["trip_distance"]), "float64")
        fare = pc.cast(pc.utf8_trim_whitespace(t["fare_amount"]), "float64")
        ok = pc.and_kleene(
            pc.and_kleene(pc.greater_equal(fare, 0), pc.greater(dist, 0)), pc.greater(t["dropoff_at"], t["pickup_at"])
        )
        kept += pc.sum(pc.fill_null(ok, False)).as_py()
    return kept


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/run_transform.py",
            "--rows",
            str(ROWS),
            "--files",
            str(FILES),
            "--repeat",
            "1",
            "--data-dir",
            str(base / "data"),
            "--results",
            str(base / "results"),
            "--name",
            "smoke",
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((base / "results" / "smoke.json").read_text())
    return result, base / "data" / f"rows{ROWS}-files{FILES}"


@pytest.mark.timeout(360)  # its setup runs the module's benchmark (~60 s idle; 120 s was hit at load 20)
def test_every_engine_runs_and_agrees_with_an_independent_count(bench: tuple[dict, Path]) -> None:
    result, data = bench
    names = [r["engine"] for r in result["results"]]
    for required in ("etl process", "etl serial", "etl thread", "plain pandas", "by-hand Pool"):
        assert any(n.startswith(required) for n in names), names
    assert any(n.startswith("dask") for n in names) == (importlib.util.find_spec("dask") is not None)
    assert ("duckdb" in names) == (importlib.util.find_spec("duckdb") is not None)
    assert result["problems"] == []
    want = expected_rows(data)
    assert 0 < want < ROWS  # the filter drops some rows: a no-op filter would not pass
    for r in result["results"]:
        assert not r["failed"], r
        assert r["check"]["rows"] == want, r["engine"]
        assert r["check"]["months"] == 6, r["engine"]
        assert r["check"]["fare_sum"] == pytest.approx(result["results"][0]["check"]["fare_sum"], rel=1e-9)


@pytest.mark.timeout(360)  # its setup runs the module's benchmark (~60 s idle; 120 s was hit at load 20)
def test_figures_and_markdown_are_written(bench: tuple[dict, Path]) -> None:
    result, data = bench
    md = (data.parent.parent / "results" / "smoke.md").read_text()
    for r in result["results"]:
        assert r["engine"] in md
        assert r["cpu"] > 0 and r["peak_rss"] > 0 and r["rows_per_s"] > 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["pandas"]
    assert "etl process throughput vs plain pandas" in md


def test_cpu_of_orphaned_grandchildren_is_counted(tmp_path: Path) -> None:
    """A grandchild that outlives its parent still counts (pool workers, forkservers do)."""
    burner = textwrap.dedent("""
        import os, time
        if os.fork() == 0:
            t = time.process_time()
            while time.process_time() - t < 0.5:
                pass
            os._exit(0)
    """)  # the parent exits at once; the orphan burns 0.5 s of CPU
    probe = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from benchmarks.common import become_subreaper, measure
        become_subreaper()
        m = measure([sys.executable, "-c", {burner!r}])
        print(json.dumps({{"cpu": m.cpu, "rc": m.returncode}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["rc"] == 0
    assert figures["cpu"] >= 0.45  # the orphan's CPU, which a plain wait() would lose


def test_cpu_of_forkserver_grandchildren_is_counted() -> None:
    """The tool's pool: workers forked by a forkserver (a child of the run) are not the
    run's children, so its getrusage misses them; the runner, as subreaper, counts them."""
    pool = textwrap.dedent("""
        import multiprocessing as mp, os, sys, time
        def burn(_):
            t = time.process_time()
            while time.process_time() - t < 0.4:
                pass
            return os.getpid(), time.process_time()
        if __name__ == "__main__":
            with mp.get_context("forkserver").Pool(2) as pool:
                done = dict(pool.map(burn, range(2), chunksize=1))
            print(sum(done.values()), len(done))
    """)
    probe = textwrap.dedent(f"""
        import json, sys, pathlib, tempfile
        sys.path.insert(0, {str(REPO)!r})
        from benchmarks.common import become_subreaper, measure
        become_subreaper()
        script = pathlib.Path(tempfile.mkdtemp()) / "pool.py"
        script.write_text({pool!r})
        m = measure([sys.executable, str(script)])
        print(json.dumps({{"cpu": m.cpu, "rc": m.returncode, "out": m.output}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["rc"] == 0, figures["out"]
    workers_cpu, workers = figures["out"].split()[-2:]
    assert float(workers_cpu) >= 0.8  # what the workers say they burned ...
    assert figures["cpu"] >= float(workers_cpu)  # ... is all in the measured tree's CPU


@pytest.mark.timeout(360)  # five engines as real programs on a shared machine (~80 s idle); a hang still fails
def test_the_wide_job_runs_on_every_engine_and_they_agree(tmp_path: Path) -> None:
    """Issue #15's second job at 20k rows: every engine installed runs it, all agree with
    an independent pyarrow count of the job's filter."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/run_transform.py", "--job", "wide", "--rows", str(ROWS), "--files", "2"]
        + ["--repeat", "1", "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path / "results")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "results" / "wide.json").read_text())
    names = [r["engine"] for r in result["results"]]
    assert names[:2] == ["etl process (defaults)", "plain pandas"]
    assert ("polars (lazy)" in names) == (importlib.util.find_spec("polars") is not None)
    assert result["problems"] == []
    kept = 0
    for path in sorted((tmp_path / "data" / f"wide-rows{ROWS}-files2").glob("orders-*.csv.gz")):
        t = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),  # comments hold quoted newlines
            convert_options=pacsv.ConvertOptions(
                include_columns=["created_at", "shipped_at", "unit_price"],
                column_types={"unit_price": "string", "shipped_at": "string"},
            ),
        )
        shipped = pc.strptime(t["shipped_at"], format="%d/%m/%Y %H:%M", unit="s", error_is_null=True)
        price = pc.cast(pc.utf8_trim_whitespace(t["unit_price"]), "float64")
        ok = pc.and_kleene(pc.greater(price, 0), pc.greater_equal(shipped, t["created_at"].cast("timestamp[s]")))
        kept += pc.sum(pc.fill_null(ok, False)).as_py()
    assert 0 < kept < ROWS
    for r in result["results"]:
        assert not r["failed"], r
        assert r["check"]["rows"] == kept, r["engine"]
        assert r["check"]["months"] == 6 and r["cpu_per_mrows"] > 0, r["engine"]
    md = (tmp_path / "results" / "wide.md").read_text()
    assert "CPU s / M rows" in md and "etl (defaults) CPU-s per M rows / duckdb's" in md


def test_a_wrong_engine_output_is_a_mismatch(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for month, fares in (("2024-01", [1.0, 2.0]), ("2024-02", [3.0])):
        folder = tmp_path / f"month={month}"
        folder.mkdir()
        t = pa.table({"fare_amount": fares, "duration_min": [5.0] * len(fares), "borough": ["Queens"] * len(fares)})
        pq.write_table(t, folder / "part-0.parquet")
    got = check_output(tmp_path)
    assert got == {"rows": 3, "fare_sum": 6.0, "duration_sum": 15.0, "unmatched_zone": 0, "months": 2}
    assert differences(got, got) == []
    assert differences({**got, "rows": 2}, got) == ["rows 2 != 3"]
    assert differences({**got, "fare_sum": 6.5}, got)


@pytest.mark.parametrize("kind", ["etl", "nginx"])
def test_benchmark_servers_serve_the_folder(tmp_path: Path, kind: str) -> None:
    import urllib.request

    from benchmarks.common import serve

    if kind == "nginx" and nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    body = bytes(range(256)) * 4096
    (tmp_path / "trips-000.csv.gz").write_bytes(body)
    server = serve(tmp_path, kind)
    try:
        with urllib.request.urlopen(f"{server.url}/trips-000.csv.gz", timeout=10) as r:
            assert r.read() == body
        assert server.pid > 0
    finally:
        server.stop()


def test_profile_shape_sorts_samples_by_process_and_stage(tmp_path: Path) -> None:
    from benchmarks.profile_shape import classify, summarise

    parent = 'process 1:"python run.py --config job.toml"'
    worker = f'{parent};process 2:"python -c from multiprocessing.forkserver import main"'
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"{worker};run_chunk (etl/transform/worker.py:80);parse_csv_chunk (etl/core/chunks.py:150) 30\n"
        f"{worker};run_chunk (etl/transform/worker.py:80);_to_timestamp (etl/transform/casts.py:290) 20\n"
        f"{worker};<module> (x:1);_find_and_load (<frozen importlib._bootstrap>:1176) 5\n"
        f"{parent};main (run.py:9);_find_and_load (<frozen importlib._bootstrap>:1176) 10\n"
        f"{parent};Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 99\n"
        f"{parent} 7\n"
    )
    assert classify(f"{worker};serve (etl/transform/worker.py:150);_send (x:1)") == ("workers", "start-up, IPC")
    s = summarise(raw)
    assert s["samples"] == 65 and s["idle_samples"] == 106
    shares = {(r["side"], r["category"]): r["samples"] for r in s["rows"]}
    assert shares == {
        ("workers", "parse CSV"): 30,
        ("workers", "timestamps (parse_datetime)"): 20,
        ("workers", "start-up imports"): 5,
        ("parent", "imports"): 10,
    }


def test_parent_cpu_splits_the_tree_and_accounts_the_parent(tmp_path: Path) -> None:
    """benchmarks/parent_cpu.py: a real default run of the wide job; the parent's own CPU
    is part of the tree's, and the instrumented run finds the Parquet encoding and the
    parent's threads (the figures themselves are what it prints, never asserted). A program of
    its own, as the benchmarks are: its runner kills and reaps every child of the process it
    runs in, which in pytest's would be the fork server and resource tracker of later tests."""
    argv = [sys.executable, "benchmarks/parent_cpu.py", "--rows", str(ROWS), "--files", "1", "--repeat", "1"]
    argv += ["--sections", "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path / "results")]
    proc = subprocess.run([*argv, "--name", "p"], cwd=REPO, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "results" / "p.json").read_text())
    (median,) = out["medians"]
    assert 0 < median["parent_cpu"] < median["tree_cpu"]
    (sections,) = out["sections"].values()
    assert sections["write: Parquet encode (ParquetWriter.write_table)"] > 0
    assert sections["thread: main"] > 0 and sections["total (process)"] >= sections["thread: main"]
    assert "| tree CPU s | CPU-s / M rows |" in (tmp_path / "results" / "p.md").read_text()

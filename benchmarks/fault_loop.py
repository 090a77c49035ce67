"""Fault loop (issue 21): SIGKILL transform workers mid-run, many times; no run may hang or stall.

    python benchmarks/fault_loop.py --runs 50 --rows 2000000 --files 4

The benchmark job (``jobs/transform.toml``: the trips over HTTP from a local server, the
process executor with 2 workers) runs once serially (the reference output) and
``--baseline`` times undisturbed, and once more every ``BASELINE_EVERY`` runs (the normal
wall time: the median of the last ``--baseline``, so a shared machine's drifting load is
followed). Then ``--runs`` runs, each with one transform worker SIGKILLed at a chosen
moment, rotating through:

* ``receive``: the worker is in ``read()`` on its pipe and its read count is growing (a
  chunk is arriving);
* ``send``: the worker is in ``write()`` (its result is leaving);
* ``idle``: the worker is in ``read()`` and its read count stands still (waiting for work);
* ``busy``: anything else (running the steps);
* ``random``: a uniformly random moment of the transform, whatever the worker is doing.

The moment is found by sampling ``/proc/<pid>/syscall`` and ``/proc/<pid>/io`` every
``SAMPLE_S`` (this harness polls; the tool itself never does). A moment not seen within
the run is replaced by the kill at the run's random moment, and the table says which
moments were really hit. Then ``--runs-other`` runs each of ``forkserver`` (the fork
server SIGKILLed at a random moment, then one worker, whose replacement needs a new fork
server) and ``two`` (both workers SIGKILLed at once).

Every run must exit with the serial run's code, publish the same rows (each partition's
parts read back in name order; halves of a split chunk sort in place) and take no more
than ``--stall-limit`` seconds beyond the normal wall time. The counts (runs, exits,
stalls, max extra seconds) go to ``--results/fault-loop.md`` and ``.json``; the script
exits 1 if any run failed a check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import REPO, default_server, machine, serve
from benchmarks.run_transform import dataset

HERE = Path(__file__).resolve().parent
SAMPLE_S = 0.005  # /proc sampling period while hunting a moment: a 64 KiB pipe write lasts longer
RUN_TIMEOUT_S = 300.0  # a run still going after this is a hang: killed and counted
READ, WRITE = 0, 1  # x86-64 syscall numbers, as /proc/<pid>/syscall shows them
MOMENTS = ["receive", "send", "idle", "busy", "random"]
BASELINE_EVERY = 5  # an undisturbed run every this many: a shared machine's load drifts


@dataclass
class Run:
    series: str
    wanted: str
    hit: str = ""
    wall: float = 0.0
    extra: float = 0.0
    exit: int | None = None
    same_output: bool = False
    killed: list[int] = field(default_factory=list)
    normal: float = 0.0
    """The normal wall time this run is compared with."""
    quiet: float = 0.0
    """Longest stretch with chunks in flight and no attempt starting or ending (s)."""
    quiet_extra: float = 0.0
    """``quiet`` beyond the longest of the undisturbed runs: the stall the kill caused."""
    watchdog: int = 0
    """Times the stall watchdog acted (0 expected: the pool itself never loses a chunk)."""
    load: float = 0.0
    """The machine's 1-minute load average when the run started."""
    log_tail: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50, help="runs with one worker killed (default 50)")
    p.add_argument("--runs-other", type=int, default=10, help="runs each for the fork server and two workers")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--baseline", type=int, default=3, help="undisturbed runs the normal wall time is the median of")
    p.add_argument("--stall-limit", type=float, default=5.0, help="seconds beyond normal that count as a stall")
    p.add_argument("--set", action="append", default=[], help="extra job overrides (key=value)")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/etl-fault-loop"))
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--name", default="fault-loop")
    return p.parse_args(argv)


# ------------------------------------------------------------------- the processes


def forkserver_of(run: psutil.Process) -> psutil.Process | None:
    try:
        children = run.children()
    except psutil.Error:  # the run (or a child being listed) just exited
        return None
    for child in children:
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def workers_of(run: psutil.Process) -> list[psutil.Process]:
    """The pool's workers: the fork server's children (the planner's probe is gone by then)."""
    server = forkserver_of(run)
    try:
        return server.children() if server is not None else []
    except psutil.Error:
        return []


def state_of(pid: int, last_rchar: list[int]) -> str:
    """``receive``, ``send``, ``idle`` or ``busy`` for one sample (see the module docstring)."""
    try:
        nr = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        rchar = int(Path(f"/proc/{pid}/io").read_text().split("\n")[0].split()[1])
    except (OSError, IndexError, ValueError):
        return "gone"
    grew, last_rchar[0] = rchar > last_rchar[0], rchar
    if nr == str(READ):
        return "receive" if grew else "idle"
    if nr == str(WRITE):
        return "send"
    return "busy"


def killer(
    proc: subprocess.Popen[bytes], log: Path, run: Run, rng: random.Random, window: float, done: threading.Event
) -> None:
    """Wait for the pool (after the plan's line: the planner's probe worker is gone), then
    kill as ``run.wanted`` says."""
    try:
        tree = psutil.Process(proc.pid)
    except psutil.Error:
        return
    while not done.is_set() and not ("[plan] transform:" in log.read_text(errors="replace") and workers_of(tree)):
        done.wait(0.05)  # the pool starts after the plan and the first chunk
    if done.is_set():
        return
    deadline = time.monotonic() + rng.uniform(0.0, window)
    if run.series == "two":
        done.wait(max(0.0, deadline - time.monotonic()))
        while not done.is_set() and len(victims := workers_of(tree)) < 2:
            done.wait(SAMPLE_S)  # one is being replaced: both, or none
        run.hit = f"{len(victims)} workers"
        _kill([v.pid for v in victims], run)
        return
    if run.series == "forkserver":
        done.wait(max(0.0, deadline - time.monotonic()))
        server = forkserver_of(tree)
        victims = workers_of(tree)
        if server is not None:
            _kill([server.pid], run)
        done.wait(0.3)
        if victims and not done.is_set():
            _kill([victims[0].pid], run)
        run.hit = "fork server + worker"
        return
    # One worker: hunt the wanted moment from a random point of the first half of the window;
    # not seen by the end of the window (the run may be nearly over): kill whatever it does.
    wanted = run.wanted
    start = time.monotonic()
    hunt_from = start + rng.uniform(0.0, window / 2)
    give_up = start + window
    if wanted == "random":
        hunt_from = give_up = start + rng.uniform(0.0, window)
    counts: dict[int, list[int]] = {}
    while not done.is_set():
        now = time.monotonic()
        victims = workers_of(tree)
        states = {v.pid: state_of(v.pid, counts.setdefault(v.pid, [0])) for v in victims}  # rchar kept current
        if now >= hunt_from and victims:
            chosen = [pid for pid, state in states.items() if state == wanted]
            if chosen or now >= give_up:
                pid = chosen[0] if chosen else rng.choice(list(states))
                run.hit = wanted if chosen else f"{'' if wanted == 'random' else 'fallback '}random: {states[pid]}"
                _kill([pid], run)
                return
        done.wait(SAMPLE_S)


def _kill(pids: list[int], run: Run) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            run.killed.append(pid)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------ the runs


def job_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    sets = [f"transform.workers={args.workers}", *args.set, *extra]
    return [
        sys.executable,
        "run.py",
        "--config",
        str(HERE / "jobs" / "transform.toml"),
        "--full-refresh",
        "--quiet",
        *[a for s in sets for a in ("--set", s)],
    ]


def run_job(
    args: argparse.Namespace, env: dict[str, str], extra: list[str], run: Run | None, rng: random.Random, window: float
) -> tuple[float, int | None, str]:
    for name in ("out", "state"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    log = args.work / "run.log"
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(job_command(args, extra), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()
        hunter = threading.Thread(target=killer, args=(proc, log, run, rng, window, done)) if run else None
        if hunter is not None:
            hunter.start()
        try:
            code: int | None = proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # a hang: stop it the way cron's operator would
            code = None
            proc.wait(60)
        wall = time.perf_counter() - start
        done.set()
        if hunter is not None:
            hunter.join()
    return wall, code, log.read_text(errors="replace")[-2000:]


def quiet_of(state: Path) -> tuple[float, int, float]:
    """From the run report: the longest quiet stretch (chunks in flight, no attempt starting
    or ending: ``transform.longest_quiet_seconds``), the watchdog's actions, the transform's wall."""
    reports = sorted(state.rglob("reports/run-*.json"))
    if not reports:
        return float("nan"), 0, float("nan")
    transform = json.loads(reports[-1].read_text()).get("summary", {}).get("transform", {})
    return (
        float(transform.get("longest_quiet_seconds", "nan")),
        int(transform.get("stalls", 0)),
        float(transform.get("wall_seconds", "nan")),
    )


def published(out: Path) -> dict[str, pa.Table]:
    """Each partition folder's rows: its parts read in name order (the serial row order)."""
    tables: dict[str, list[pa.Table]] = {}
    for path in sorted(out.rglob("*.parquet")):
        tables.setdefault(str(path.parent.relative_to(out)), []).append(pq.read_table(path, partitioning=None))
    return {k: pa.concat_tables(v) for k, v in tables.items()}


def same(a: dict[str, pa.Table], b: dict[str, pa.Table]) -> bool:
    return a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = dataset(args.data_dir, args.rows, args.files)
    args.work.mkdir(parents=True, exist_ok=True)
    server = serve(data, default_server())
    rng = random.Random(args.seed)
    env = {
        **os.environ,
        "BENCH_STATE": str(args.work / "state"),
        "BENCH_OUT": str(args.work / "out"),
        "BENCH_DATA": str(data),
        "BENCH_URLS": f"{server.url}/trips-{{000..{args.files - 1:03d}}}.csv.gz",
    }
    try:
        wall, serial_code, tail = run_job(args, env, ["transform.executor=serial"], None, rng, 0)
        assert serial_code in (0, 3), tail
        reference = published(args.work / "out")
        print(f"serial: {wall:.1f}s, exit {serial_code}", flush=True)
        walls: list[float] = []
        quiets: list[float] = []
        transform_walls: list[float] = []

        def undisturbed() -> float:
            """One more undisturbed run; the normal wall time: the median of the last ``--baseline``."""
            wall, code, tail = run_job(args, env, [], None, rng, 0)
            assert code == serial_code and same(published(args.work / "out"), reference), tail
            walls.append(wall)
            quiet, _, transform_wall = quiet_of(args.work / "state")
            quiets.append(quiet)
            transform_walls.append(transform_wall)
            print(f"undisturbed: {wall:.1f}s, quiet {quiets[-1]:.1f}s, load {os.getloadavg()[0]:.1f}", flush=True)
            return statistics.median(walls[-args.baseline :])

        for _ in range(args.baseline):
            normal = undisturbed()
        window = 0.8 * statistics.median(transform_walls)  # kills land in the transform's first 80 %
        plan = [Run("worker", MOMENTS[i % len(MOMENTS)]) for i in range(args.runs)]
        plan += [Run(s, s) for s in ("forkserver", "two") for _ in range(args.runs_other)]
        for n, run in enumerate(plan, 1):
            if n % BASELINE_EVERY == 0:  # the shared machine's load drifts: keep "normal" current
                normal = undisturbed()
            run.normal, run.load = normal, os.getloadavg()[0]
            run.wall, run.exit, tail = run_job(args, env, [], run, rng, window)
            run.extra = max(0.0, run.wall - run.normal)
            run.quiet, run.watchdog, _ = quiet_of(args.work / "state")
            run.quiet_extra = max(0.0, run.quiet - max(quiets))
            run.same_output = run.exit == serial_code and same(published(args.work / "out"), reference)
            ok = run.same_output and run.quiet_extra <= args.stall_limit
            if not ok:
                run.log_tail = tail
            print(
                f"{n:3d} {run.series:10s} {run.wanted:8s} hit={run.hit:22s} exit={run.exit} "
                f"{run.wall:5.1f}s (+{run.extra:.1f}) quiet {run.quiet:.1f}s (+{run.quiet_extra:.1f}) "
                f"{'ok' if ok else 'FAILED'}",
                flush=True,
            )
    finally:
        server.stop()
    return report(args, plan, normal, walls, quiets, serial_code)


def report(
    args: argparse.Namespace, plan: list[Run], normal: float, walls: list[float], quiets: list[float], serial_code: int
) -> int:
    rows = []
    for series in ("worker", "forkserver", "two"):
        runs = [r for r in plan if r.series == series]
        if not runs:
            continue
        exits: dict[str, int] = {}
        for r in runs:
            exits[str(r.exit)] = exits.get(str(r.exit), 0) + 1
        hits: dict[str, int] = {}
        for r in runs:
            hits[r.hit or "none"] = hits.get(r.hit or "none", 0) + 1
        rows.append(
            {
                "series": series,
                "runs": len(runs),
                "exits": exits,
                "same_output": sum(r.same_output for r in runs),
                "stalls": sum(r.quiet_extra > args.stall_limit for r in runs),
                "hangs": sum(r.exit is None for r in runs),
                "max_stall_s": round(max(r.quiet_extra for r in runs), 2),
                "max_quiet_s": round(max(r.quiet for r in runs), 2),
                "watchdog_actions": sum(r.watchdog for r in runs),
                "wall_over_limit": sum(r.extra > args.stall_limit for r in runs),
                "max_extra_wall_s": round(max(r.extra for r in runs), 2),
                "median_extra_wall_s": round(statistics.median(r.extra for r in runs), 2),
                "moments": hits,
            }
        )
    failed = [r for r in plan if not r.same_output or r.quiet_extra > args.stall_limit]
    doc = {
        "command": "python benchmarks/fault_loop.py " + " ".join(argv_of(args)),
        "normal_wall_s": round(normal, 2),
        "undisturbed_walls_s": [round(w, 2) for w in walls],
        "undisturbed_quiet_s": [round(q, 2) for q in quiets],
        "serial_exit": serial_code,
        "stall_limit_s": args.stall_limit,
        "series": rows,
        "failed": [asdict(r) for r in failed],
        "machine": machine(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Fault loop: SIGKILLed transform workers (issue 21)",
        "",
        f"`{doc['command']}`: {args.rows:,} rows in {args.files} gzip CSV files over HTTP, "
        f"process executor, {args.workers} workers. Normal wall time: the median of the last "
        f"{args.baseline} undisturbed runs (one every {BASELINE_EVERY} runs: {min(walls):.1f} to "
        f"{max(walls):.1f} s, median {statistics.median(walls):.1f} s, load average "
        f"{min(r.load for r in plan):.1f} to {max(r.load for r in plan):.1f} on this shared machine); "
        f"*extra wall* is the time beyond it.",
        "",
        "A **stall** is measured inside the run, where load cannot blur it: the run report's",
        "`transform.longest_quiet_seconds` (the longest stretch with chunks in flight and no",
        "attempt starting or ending) beyond the longest of the undisturbed runs "
        f"({max(quiets):.1f} s); more than {args.stall_limit:g} s counts.",
        "",
        "| series | runs | exits | output = serial | stalls | hangs | max stall s | max quiet s "
        "| watchdog acted | extra wall > limit | max / median extra wall s | moments hit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        exit_counts = ", ".join(f"{k}: {v}" for k, v in sorted(row["exits"].items()))
        moments = ", ".join(f"{k}: {v}" for k, v in sorted(row["moments"].items()))
        lines.append(
            f"| {row['series']} | {row['runs']} | {exit_counts} | {row['same_output']} | {row['stalls']} | {row['hangs']} "
            f"| {row['max_stall_s']} | {row['max_quiet_s']} | {row['watchdog_actions']} | {row['wall_over_limit']} "
            f"| {row['max_extra_wall_s']} / {row['median_extra_wall_s']} | {moments} |"
        )
    lines += ["", f"Failed runs: {len(failed)}.", ""]
    (args.results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if failed else 0


def argv_of(args: argparse.Namespace) -> list[str]:
    out = [f"--runs {args.runs}", f"--runs-other {args.runs_other}", f"--rows {args.rows}", f"--files {args.files}"]
    return out + [f"--set {s}" for s in args.set]


if __name__ == "__main__":
    sys.exit(main())

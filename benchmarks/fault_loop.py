"""Fault loop (issue 21): SIGKILL transform workers mid-run, many times; no run may hang or stall.

    python benchmarks/fault_loop.py --rows 2000000 --files 4      # the issue's loop (defaults)
    python benchmarks/fault_loop.py --quick                       # a few runs at 200k rows

The benchmark job (``jobs/transform.toml``: the trips over HTTP from a local server, the
process executor with 2 workers) runs once serially (the reference output). Then
``--runs`` runs (default 50), each with one transform worker SIGKILLed at a chosen moment,
rotating through:

* ``receive``: the worker is in ``read()`` on its pipe and its read count is growing (a
  chunk is arriving);
* ``send``: the worker is in ``write()`` (its result is leaving);
* ``idle``: the worker is in ``read()`` and its read count stands still (waiting for work);
* ``busy``: anything else (running the steps);
* ``random``: a uniformly random moment of the transform, whatever the worker is doing.

The moment is found by sampling ``/proc/<pid>/syscall`` and ``/proc/<pid>/io`` every
``SAMPLE_S`` (this harness polls; the tool itself never does). A moment not seen within
the run is replaced by the kill at the run's random moment, and the table says which
moments were really hit. Then ``--runs-other`` runs (default 10) each of ``forkserver``
(the fork server SIGKILLed at a random moment, then one worker, whose replacement needs
a new fork server) and ``two`` (both workers SIGKILLed at once).

**Judged in wall time** (the issue's criterion: no run stalls more than 5 s beyond its
normal time). Undisturbed runs are interleaved with the faulted ones: one first, one after
every ``--undisturbed-every`` faulted runs, and one last, so a shared machine's drifting
load touches both alike. A run's *normal* wall time is the median of the ``--neighbours``
undisturbed runs nearest to it in the sequence (before and after it: 2 and 2 by default);
*extra* is its wall time beyond that, and more than ``--stall-limit`` (5 s) is a **stall**.
The undisturbed runs are judged the same way against their own neighbours: their spread
is the machine's noise, printed beside the verdict (a noise near the limit means the
machine was too busy for the verdict to mean much). The run report's
``transform.longest_quiet_seconds`` (chunks in flight, no attempt starting or ending) is
kept as a load-independent diagnostic.

Every faulted run must exit with the serial run's code, publish the same rows (each
partition's parts read back in name order; halves of a split chunk sort in place), end
within ``RUN_TIMEOUT_S`` (else it is a hang) and not stall. Medians, ratios (wall over
normal) and counts go to ``--results/<name>.md`` and ``.json``; the script exits 1 if any
run failed a check.
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


@dataclass
class Run:
    series: str
    wanted: str
    hit: str = ""
    wall: float = 0.0
    extra: float = 0.0
    """``wall`` minus ``normal`` (negative: faster than normal)."""
    exit: int | None = None
    same_output: bool = False
    killed: list[int] = field(default_factory=list)
    normal: float = 0.0
    """The median wall time of the undisturbed runs nearest to this one (see ``judge``)."""
    quiet: float = 0.0
    """Longest stretch with chunks in flight and no attempt starting or ending (s)."""
    quiet_extra: float = 0.0
    """``quiet`` beyond the longest of the undisturbed runs: the stall the kill caused."""
    watchdog: int = 0
    """Times the stall watchdog acted (0 expected: the pool itself never loses a chunk)."""
    load: float = 0.0
    """The machine's 1-minute load average when the run started."""
    log_tail: str = ""
    position: int = 0
    """Place in the sequence of runs (undisturbed ones included): what "nearest" means."""
    ratio: float = 0.0
    """``wall`` over ``normal``."""


QUICK = {  # --quick: a smoke run of every series in a few minutes (results under their own name)
    "runs": 5,
    "runs_other": 2,
    "rows": 200_000,
    "undisturbed_every": 1,
    "name": "fault-loop-quick",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a few runs at a small size: {QUICK}")
    p.add_argument("--runs", type=int, default=50, help="runs with one worker killed (default 50)")
    p.add_argument(
        "--runs-other", type=int, default=10, help="runs each with the fork server killed and two workers (default 10)"
    )
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--undisturbed-every", type=int, default=2, help="an undisturbed run after every this many faulted runs"
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=4,
        help="undisturbed runs (nearest in the sequence) a run's normal is the median of",
    )
    p.add_argument("--stall-limit", type=float, default=5.0, help="seconds beyond normal that count as a stall")
    p.add_argument("--set", action="append", default=[], help="extra job overrides (key=value)")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/etl-fault-loop"))
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--name", default="fault-loop")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)  # explicit options still win
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
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:  # not even SIGTERM stops it: count it, go on with the loop
                proc.kill()
                proc.wait()
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


def judge(runs: list[Run], neighbours: int) -> None:
    """Each run's normal wall time: the median of the ``neighbours`` undisturbed runs nearest
    to it in the sequence (by position; on a tie the earlier), itself excluded."""
    calm = [r for r in runs if r.series == "undisturbed"]
    for run in runs:
        near = sorted((u for u in calm if u is not run), key=lambda u: (abs(u.position - run.position), u.position))
        walls = [u.wall for u in near[:neighbours]]
        run.normal = statistics.median(walls) if walls else float("nan")
        run.extra = run.wall - run.normal
        run.ratio = run.wall / run.normal if run.normal > 0 else float("nan")


def sequence(plan: list[Run], every: int) -> list[Run]:
    """The faulted runs with undisturbed ones interleaved: first, after every ``every``, last."""
    out = [Run("undisturbed", "none")]
    for n, run in enumerate(plan, 1):
        out.append(run)
        if n % every == 0 or n == len(plan):
            out.append(Run("undisturbed", "none"))
    for position, run in enumerate(out):
        run.position = position
    return out


def failed(run: Run, limit: float) -> bool:
    return run.series != "undisturbed" and (not run.same_output or run.exit is None or run.extra > limit)


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
    plan = [Run("worker", MOMENTS[i % len(MOMENTS)]) for i in range(args.runs)]
    plan += [Run(s, s) for s in ("forkserver", "two") for _ in range(args.runs_other)]
    runs = sequence(plan, max(1, args.undisturbed_every))
    try:
        wall, serial_code, tail = run_job(args, env, ["transform.executor=serial"], None, rng, 0)
        assert serial_code in (0, 3), tail
        reference = published(args.work / "out")
        print(f"serial: {wall:.1f}s, exit {serial_code}", flush=True)
        transform_walls: list[float] = []
        for run in runs:
            calm = run.series == "undisturbed"
            window = 0.0 if calm else 0.8 * statistics.median(transform_walls)  # kills land in the first 80 %
            run.load = os.getloadavg()[0]
            run.wall, run.exit, tail = run_job(args, env, [], None if calm else run, rng, window)
            run.quiet, run.watchdog, transform_wall = quiet_of(args.work / "state")
            run.same_output = run.exit == serial_code and same(published(args.work / "out"), reference)
            if calm:
                assert run.same_output, tail  # an undisturbed run must succeed: else the loop means nothing
                transform_walls.append(transform_wall)
            elif not run.same_output:
                run.log_tail = tail
            print(
                f"{run.position:3d} {run.series:11s} {run.wanted:8s} hit={run.hit:22s} exit={run.exit} "
                f"{run.wall:5.1f}s quiet {run.quiet:.1f}s load {run.load:.1f}",
                flush=True,
            )
    finally:
        server.stop()
    judge(runs, args.neighbours)
    calm_quiet = max(r.quiet for r in runs if r.series == "undisturbed")
    for run in runs:
        run.quiet_extra = max(0.0, run.quiet - calm_quiet)
        if failed(run, args.stall_limit) and not run.log_tail:
            run.log_tail = "(wall-time stall: the log showed no error)"
    return report(args, runs, serial_code)


def report(args: argparse.Namespace, runs: list[Run], serial_code: int) -> int:
    limit = args.stall_limit
    calm = [r for r in runs if r.series == "undisturbed"]
    noise = max(abs(r.extra) for r in calm)
    rows = []
    for series in ("worker", "forkserver", "two"):
        these = [r for r in runs if r.series == series]
        if not these:
            continue
        exits: dict[str, int] = {}
        hits: dict[str, int] = {}
        for r in these:
            exits[str(r.exit)] = exits.get(str(r.exit), 0) + 1
            hits[r.hit or "none"] = hits.get(r.hit or "none", 0) + 1
        rows.append(
            {
                "series": series,
                "runs": len(these),
                "exits": exits,
                "same_output": sum(r.same_output for r in these),
                "hangs": sum(r.exit is None for r in these),
                "stalls": sum(r.extra > limit for r in these),
                "median_normal_s": round(statistics.median(r.normal for r in these), 2),
                "median_wall_s": round(statistics.median(r.wall for r in these), 2),
                "median_ratio": round(statistics.median(r.ratio for r in these), 3),
                "median_extra_s": round(statistics.median(r.extra for r in these), 2),
                "max_extra_s": round(max(r.extra for r in these), 2),
                "max_quiet_s": round(max(r.quiet for r in these), 2),
                "watchdog_actions": sum(r.watchdog for r in these),
                "moments": hits,
            }
        )
    bad = [r for r in runs if failed(r, limit)]
    doc = {
        "command": "python benchmarks/fault_loop.py " + " ".join(argv_of(args)),
        "serial_exit": serial_code,
        "stall_limit_s": limit,
        "undisturbed": {
            "runs": len(calm),
            "walls_s": [round(r.wall, 2) for r in calm],
            "median_wall_s": round(statistics.median(r.wall for r in calm), 2),
            "noise_s": round(noise, 2),
            "max_quiet_s": round(max(r.quiet for r in calm), 2),
        },
        "load": [round(min(r.load for r in runs), 1), round(max(r.load for r in runs), 1)],
        "series": rows,
        "failed": [asdict(r) for r in bad],
        "runs": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(r).items() if k != "log_tail"}
            for r in runs
        ],
        "machine": machine(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Fault loop: SIGKILLed transform workers (issue 21)",
        "",
        f"`{doc['command']}`: {args.rows:,} rows in {args.files} gzip CSV files over HTTP, process executor, "
        f"{args.workers} workers; load average {doc['load'][0]} to {doc['load'][1]}.",
        "",
        f"Judged in wall time: {len(calm)} undisturbed runs interleaved (one every {args.undisturbed_every} "
        f"faulted runs, first and last included; median {doc['undisturbed']['median_wall_s']} s). A run's *normal* "
        f"is the median wall time of the {args.neighbours} undisturbed runs nearest to it in the sequence; *extra* "
        f"is its wall time beyond normal, *ratio* wall / normal. A **stall** is extra > {limit:g} s.",
        f"Noise: the undisturbed runs themselves lie within {noise:.2f} s of their own neighbours' median"
        + (" (above the limit: too busy a machine for the verdict to mean much)." if noise > limit else "."),
        "",
        "| series | runs | exits | output = serial | hangs | stalls (extra > limit) | median normal s "
        "| median wall s | median ratio | median / max extra s | max quiet s | watchdog acted | moments hit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        exit_counts = ", ".join(f"{k}: {v}" for k, v in sorted(row["exits"].items()))
        moments = ", ".join(f"{k}: {v}" for k, v in sorted(row["moments"].items()))
        lines.append(
            f"| {row['series']} | {row['runs']} | {exit_counts} | {row['same_output']} | {row['hangs']} "
            f"| {row['stalls']} | {row['median_normal_s']} | {row['median_wall_s']} | {row['median_ratio']} "
            f"| {row['median_extra_s']} / {row['max_extra_s']} | {row['max_quiet_s']} | {row['watchdog_actions']} "
            f"| {moments} |"
        )
    lines += [
        "",
        f"*max quiet s*: the run report's `transform.longest_quiet_seconds` (chunks in flight, no attempt "
        f"starting or ending), {doc['undisturbed']['max_quiet_s']} s at most in the undisturbed runs.",
        "",
        f"Failed runs: {len(bad)}"
        + (
            ": " + ", ".join(f"#{r.position} {r.series}/{r.hit or r.wanted} exit {r.exit} +{r.extra:.1f}s" for r in bad)
            if bad
            else "."
        ),
        "",
    ]
    (args.results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if bad else 0


def argv_of(args: argparse.Namespace) -> list[str]:
    out = ["--quick"] if args.quick else []
    out += [f"--runs {args.runs}", f"--runs-other {args.runs_other}", f"--rows {args.rows}", f"--files {args.files}"]
    out += [f"--undisturbed-every {args.undisturbed_every}", f"--neighbours {args.neighbours}"]
    return out + [f"--set {s}" for s in args.set]


if __name__ == "__main__":
    sys.exit(main())

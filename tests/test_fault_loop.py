"""benchmarks/fault_loop.py's verdict (issue 21): a faulted run is judged in wall time against
the undisturbed runs interleaved with it. The loop itself is run by hand (it takes minutes);
these tests check the judging on made-up walls, and the defaults the issue asks for."""

from __future__ import annotations

from benchmarks.fault_loop import QUICK, Run, failed, judge, parse_args, sequence


def test_defaults_are_the_issues_loop_and_quick_is_small() -> None:
    args = parse_args(["--rows", "2000000", "--files", "4"])
    assert (args.runs, args.runs_other, args.workers, args.stall_limit) == (50, 10, 2, 5.0)
    quick = parse_args(["--quick"])
    assert (quick.runs, quick.runs_other, quick.rows, quick.name) == (
        QUICK["runs"],
        QUICK["runs_other"],
        QUICK["rows"],
        "fault-loop-quick",
    )
    assert parse_args(["--quick", "--runs", "7"]).runs == 7  # an explicit option wins


def test_undisturbed_runs_are_interleaved_first_between_and_last() -> None:
    plan = [Run("worker", "idle") for _ in range(5)]
    runs = sequence(plan, every=2)
    kinds = ["U" if r.series == "undisturbed" else "F" for r in runs]
    assert "".join(kinds) == "UFFUFFUFU"
    assert [r.position for r in runs] == list(range(len(runs)))


def test_a_run_is_judged_against_its_nearest_undisturbed_neighbours() -> None:
    """The machine slows down halfway: each faulted run is compared with the undisturbed
    runs around it, so the slow second half is not a stall, and a real 7 s stall is."""
    plan = [Run("worker", "busy") for _ in range(6)]
    runs = sequence(plan, every=1)  # U F U F U F U F U F U F U
    calm_walls = iter([10.0, 10.2, 9.8, 10.1, 20.0, 20.3, 19.9])
    faulted_walls = iter([10.5, 11.0, 10.4, 19.0, 27.5, 20.5])
    for r in runs:
        r.wall = next(calm_walls) if r.series == "undisturbed" else next(faulted_walls)
        r.same_output, r.exit = True, 0
    judge(runs, neighbours=2)
    faulted = [r for r in runs if r.series == "worker"]
    assert [round(r.normal, 2) for r in faulted] == [10.1, 10.0, 9.95, 15.05, 20.15, 20.1]
    assert [failed(r, 5.0) for r in faulted] == [False, False, False, False, True, False]
    assert round(faulted[4].ratio, 3) == round(27.5 / 20.15, 3)
    undisturbed = [r for r in runs if r.series == "undisturbed"]
    assert not any(failed(r, 5.0) for r in undisturbed)  # they set the normal, never fail it
    assert max(abs(r.extra) for r in undisturbed) > 4.0  # the step in load shows as noise


def test_a_hang_or_a_wrong_output_fails_whatever_the_wall_time() -> None:
    runs = sequence([Run("two", "two"), Run("forkserver", "forkserver")], every=1)
    for r in runs:
        r.wall, r.same_output, r.exit = 10.0, True, 0
    runs[1].exit, runs[1].same_output = None, False  # hung: stopped at RUN_TIMEOUT_S
    runs[3].same_output = False
    judge(runs, neighbours=2)
    assert [failed(r, 5.0) for r in runs] == [False, True, False, True, False]

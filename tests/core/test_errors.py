"""Errors cross the process boundary intact and say where they happened."""

from __future__ import annotations

import pickle

from etl.core.errors import (
    ChecksumMismatch,
    ConfigError,
    ETLError,
    ExitCode,
    Interrupted,
    SourceError,
    StepError,
    WorkerCrashed,
)


def test_errors_pickle_with_their_fields() -> None:
    errors: list[ETLError] = [
        ConfigError("unknown key", key="output.formt", file="job.toml"),
        SourceError("HTTP 503", item="http://h/a.csv", retryable=True, status=503, attempts=5),
        ChecksumMismatch("expected ab, got cd", item="http://h/a.csv", attempts=3),
        StepError("cannot cast 'x' to float64", item="a.csv[chunk 2, rows 20-29]", step="transform.steps[1] (cast)"),
        WorkerCrashed("worker died", item="a.csv[chunk 0, rows 0-9]", signal="SIGKILL"),
    ]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert str(back) == str(err)
        assert back.__dict__ == err.__dict__
    assert pickle.loads(pickle.dumps(errors[1])).retryable is True


def test_messages_name_stage_item_and_key() -> None:
    assert (
        str(ConfigError("unknown key", key="output.formt", file="job.toml"))
        == "job.toml, key output.formt: unknown key"
    )
    step = StepError("boom", item="a.csv[chunk 2, rows 20-29]", step="transform.steps[1] (cast)")
    assert str(step) == "[transform] a.csv[chunk 2, rows 20-29] transform.steps[1] (cast): boom"


def test_exit_codes() -> None:
    assert ConfigError("x").exit_code == ExitCode.BAD_CONFIG == 2
    assert StepError("x", item="i").exit_code == ExitCode.FAILED == 1
    assert Interrupted(15).exit_code == 143 and Interrupted(2).exit_code == 130
    assert WorkerCrashed("x", item="i").retryable and not StepError("x", item="i").retryable

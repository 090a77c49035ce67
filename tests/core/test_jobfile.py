"""Job file loading: key paths in errors, env references, overrides, "did you mean", explain."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from etl.core import jobfile
from etl.core.config import explain, load_job, load_job_explained
from etl.core.errors import ConfigError, ExitCode
from tests.core.jobs import BASE, write


@pytest.mark.parametrize(
    "edit, key",
    [
        (('expr = "fare > 0"', 'exp = "fare > 0"'), "transform.steps[0].exp"),
        (('expr = "fare > 0"', "expr = 5"), "transform.steps[0].expr"),
        (('path = "out"', 'path = "out"\nformt = "csv"'), "output.formt"),
        (('name = "trips"', 'name = "trips"\nworkers = 3'), "job.workers"),
        (('op = "derive"', 'op = "derived"'), "transform.steps[1]"),
        (('path = "out"', 'path = "out"\nmode = "upsert"'), "output.mode"),
    ],
)
def test_bad_keys_name_the_key_path_and_file(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    path = write(tmp_path, BASE.replace(*edit, 1))
    with pytest.raises(ConfigError) as exc:
        load_job(path)
    assert exc.value.item == key
    assert str(path) in str(exc.value) and key in str(exc.value)
    assert exc.value.exit_code == ExitCode.BAD_CONFIG


def test_not_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[job\nname=")
    with pytest.raises(ConfigError, match="not valid TOML") as exc:
        load_job(path)
    assert str(path) in str(exc.value)


def test_env_references_are_resolved_and_missing_ones_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        BASE.replace("[download]", "")
        + '\n[download]\nheaders = {Authorization = "Bearer ${API_TOKEN}", X = "${UNSET_VAR:-dflt}"}\n'
    )
    monkeypatch.setenv("API_TOKEN", "s3cret")
    cfg = load_job(write(tmp_path, text))
    assert cfg.download.headers == {"Authorization": "Bearer s3cret", "X": "dflt"}
    monkeypatch.delenv("API_TOKEN")
    with pytest.raises(ConfigError, match=r"\$\{API_TOKEN\} is not set") as exc:
        load_job(write(tmp_path, text))
    assert exc.value.item == "download.headers.Authorization"


def test_set_overrides_any_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_job(
        path,
        [
            "transform.workers=3",
            "output.format=csv",
            'transform.steps[0].expr="fare >= 1"',
            "read.chunk_rows=1000",
            "download.timeout.read=2.5",
        ],
    )
    assert cfg.transform.workers == 3
    assert cfg.output.format == "csv"
    assert cfg.transform.steps[0].expr == "fare >= 1"  # type: ignore[union-attr]
    assert cfg.read.chunk_rows == 1000
    assert cfg.download.timeout.read == 2.5


def test_bad_override_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_job(path, ["transform.workers"])
    with pytest.raises(ConfigError) as exc:
        load_job(path, ["transform.workers=-1"])
    assert exc.value.item == "transform.workers"
    with pytest.raises(ConfigError, match="no list item"):
        load_job(path, ["transform.steps[9].expr=x"])


# ------------------------------------------------ every problem at once, "did you mean"


def test_every_invalid_key_is_reported_in_one_error(tmp_path: Path) -> None:
    text = (
        BASE.replace('name = "trips"', 'name = "trips"\nworkers = 3')
        .replace('expr = "fare > 0"', 'exp = "fare > 0"')
        .replace('op = "derive"', 'op = "derived"')
        .replace('path = "out"', 'path = "out"\nformt = "csv"\nmode = "upsert"')
        + '\n[read]\nchunk_row = 5\n[download]\nheaders = {A = "${SURELY_UNSET_VAR}"}\n'
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_job(path, environ={})
    problems = dict(exc.value.problems)
    assert problems["transform.steps[0].exp"] == "unknown key; did you mean 'expr'?"
    assert "transform.steps[0].expr" not in problems  # the misspelling's "missing" twin is dropped
    assert problems["read.chunk_row"] == "unknown key; did you mean 'chunk_rows'?"
    assert problems["output.formt"] == "unknown key; did you mean 'format'?"
    assert "did you mean 'derive'?" in problems["transform.steps[1]"]
    assert (
        "did you mean" not in problems["job.workers"]
        and "known keys here: keep_reports, name" in problems["job.workers"]
    )
    assert "'overwrite' or 'append'" in problems["output.mode"]
    assert "${SURELY_UNSET_VAR} is not set" in problems["download.headers.A"]
    assert len(problems) == 7
    text_of = str(exc.value)
    assert text_of.startswith(f"{path}: 7 problems:\n")
    assert all(f"key {k}: " in text_of for k in problems)
    assert exc.value.exit_code == ExitCode.BAD_CONFIG


def test_a_union_key_gives_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_job(write(tmp_path, BASE), ["transform.in_flight=0"], environ={})
    assert [k for k, _ in exc.value.problems] == ["transform.in_flight"]
    assert "or Input should be 'auto'" in exc.value.message and exc.value.message.endswith("(set by --set)")


# ------------------------------------------------------------- environment overrides


def test_environment_overrides_any_key_between_file_and_set(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("[output]", "[read]\nchunk_rows = 10\n\n[output]"))
    env = {
        "ETL__TRANSFORM__WORKERS": "4",
        "ETL__READ__CHUNK_ROWS": "20",
        "ETL__DOWNLOAD__TIMEOUT__READ": "2.5",
        "ETL__TRANSFORM__STEPS__0__EXPR": "fare > 5",
        "ETL__OUTPUT__FORMAT": "csv",
        "ETLX_UNRELATED": "1",
    }
    cfg, origins = load_job_explained(path, ["output.format=parquet"], environ=env)
    assert cfg.transform.workers == 4
    assert cfg.read.chunk_rows == 20  # environment beats the job file
    assert cfg.download.timeout.read == 2.5
    assert cfg.transform.steps[0].expr == "fare > 5"  # type: ignore[union-attr]
    assert cfg.output.format == "parquet"  # --set beats the environment
    assert origins["transform.workers"] == "environment ETL__TRANSFORM__WORKERS"
    assert origins["output.format"] == "--set"
    lines = explain(cfg, origins, path)
    assert "transform.workers = 4    # environment ETL__TRANSFORM__WORKERS" in lines
    assert 'output.format = "parquet"    # --set' in lines
    assert "read.chunk_rows = 20    # environment ETL__READ__CHUNK_ROWS" in lines
    assert 'transform.steps[0].expr = "fare > 5"    # environment ETL__TRANSFORM__STEPS__0__EXPR' in lines
    assert 'transform.steps[1].op = "derive"    # job file' in lines
    assert "read.threads = 2    # default" in lines
    assert not any(line.startswith(("base_dir", "file", "transform.base_dir")) for line in lines)


def test_a_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_job(write(tmp_path, BASE), environ={"ETL__TRANSFORM__WROKERS": "3", "ETL__READ__CHUNK_ROWS": "lots"})
    problems = dict(exc.value.problems)
    assert problems["transform.wrokers"] == (
        "unknown key; did you mean 'workers'? (set by environment ETL__TRANSFORM__WROKERS)"
    )
    assert problems["read.chunk_rows"].endswith("(set by environment ETL__READ__CHUNK_ROWS)")


def test_explain_redacts_header_values(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '\n[download]\nheaders = {Authorization = "Bearer s3cret"}\n')
    cfg, origins = load_job_explained(path, environ={})
    lines = explain(cfg, origins, path)
    assert 'download.headers = {"Authorization": "***"}    # job file' in lines
    assert "s3cret" not in "\n".join(lines)


# ------------------------------------------------------- any model, not only JobConfig


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Add(_Model):
    op: Literal["add"]
    amount: int


class _Log(_Model):
    op: Literal["log"]
    message: str


class _Job(_Model):
    name: str
    actions: list[Annotated[_Add | _Log, Field(discriminator="op")]] = []
    home: str = ""


def test_the_loader_is_generic_over_the_model(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('name = "x"\nactions = [{op = "add", amount = "lots"}, {op = "log", mesage = "hi"}]\n')
    raw, origins, problems = jobfile.read_raw(
        path, ["actions[0].amount=2", "name=${WHO}"], {"ETL__NAME": "y"}, tags=frozenset({"add", "log"})
    )
    assert origins == {"name": "--set", "actions[0].amount": "--set"}
    assert problems == [("name", "environment variable ${WHO} is not set")]
    with pytest.raises(ConfigError) as exc:
        jobfile.validate(_Job, raw, path, origins, problems, hidden=frozenset({"home"}), tags=frozenset({"add", "log"}))
    assert dict(exc.value.problems) == {
        "name": "environment variable ${WHO} is not set",
        "actions[1].mesage": "unknown key; did you mean 'message'?",
    }
    assert str(path) in str(exc.value)
    raw["name"] = "z"
    job = jobfile.validate(_Job, {**raw, "actions": raw["actions"][:1]}, path, origins, [])
    assert job.actions == [_Add(op="add", amount=2)]
    assert jobfile.key_path(("actions", 1, "log", "mesage"), frozenset({"add", "log"})) == "actions[1].mesage"
    assert [k for k in jobfile.json_schema(_Job, hidden=frozenset({"home"}), title="t")["properties"]] == [
        "name",
        "actions",
    ]

"""Job file loading: key paths in errors, env references, overrides, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from etl.core.config import JobConfig, LookupStep, load_job, parse_size
from etl.core.errors import ConfigError, ExitCode

BASE = """
[job]
name = "trips"

[sources]
urls = ["data/*.csv"]

[transform]
steps = [
  {op = "filter", expr = "fare > 0"},
  {op = "derive", columns = {tip_ratio = "tip / fare"}},
  {op = "lookup", path = "zones.csv", on = "zone"},
]

[output]
path = "out"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_valid_job_resolves_relative_paths_against_job_folder(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, BASE))
    assert isinstance(cfg, JobConfig)
    assert cfg.output.path == tmp_path.resolve() / "out"
    assert cfg.job.state_dir == tmp_path.resolve() / ".etl-state"
    lookup = cfg.transform.steps[2]
    assert isinstance(lookup, LookupStep) and lookup.path == tmp_path.resolve() / "zones.csv"
    assert cfg.transform.base_dir == tmp_path.resolve()


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


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.*required key is missing"):
        load_job(write(tmp_path, BASE.split("[output]")[0]))


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


def test_sizes_and_memory_limit(tmp_path: Path) -> None:
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("300 MiB") == 300 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")
    path = write(tmp_path, BASE + '\n[resources]\nmemory_limit = "150%"\n')
    with pytest.raises(ConfigError) as exc:
        load_job(path)
    assert exc.value.item == "resources.memory_limit"

"""The job model: a valid job file, relative paths, a missing section, the JSON Schema."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from etl.core.config import JobConfig, LookupStep, json_schema, load_job
from etl.core.errors import ConfigError
from tests.core.jobs import BASE, write


def test_valid_job_resolves_relative_paths_against_job_folder(tmp_path: Path) -> None:
    cfg = load_job(write(tmp_path, BASE))
    assert isinstance(cfg, JobConfig)
    assert cfg.output.path == tmp_path.resolve() / "out"
    assert cfg.job.state_dir == tmp_path.resolve() / ".etl-state"
    lookup = cfg.transform.steps[2]
    assert isinstance(lookup, LookupStep) and lookup.path == tmp_path.resolve() / "zones.csv"
    assert cfg.transform.base_dir == tmp_path.resolve()


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output.*required key is missing"):
        load_job(write(tmp_path, BASE.split("[output]")[0]))


def test_a_bad_memory_limit_names_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '\n[resources]\nmemory_limit = "150%"\n')
    with pytest.raises(ConfigError) as exc:
        load_job(path)
    assert exc.value.item == "resources.memory_limit"


# -------------------------------------------------------------------- JSON Schema


def test_json_schema_describes_every_key_and_checks_the_example_jobs() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    missing = [
        f"{name}.{key}"
        for name, d in [("job file", schema), *schema["$defs"].items()]
        for key, prop in d.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert missing == []
    assert "base_dir" not in schema["properties"] and "file" not in schema["properties"]
    validator = jsonschema.Draft202012Validator(schema)
    root = Path(__file__).resolve().parents[2]
    jobs = sorted((root / "config").glob("*.toml"))
    assert jobs
    for job in jobs:
        assert list(validator.iter_errors(tomllib.loads(job.read_text()))) == [], job
    bad = tomllib.loads(BASE.replace('expr = "fare > 0"', 'exp = "fare > 0"'))
    assert [e.validator for e in validator.iter_errors(bad)]  # an editor would flag it

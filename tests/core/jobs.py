"""A small job file the config and job-file tests share."""

from __future__ import annotations

from pathlib import Path

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

"""Folders for the download tests: a site a test server serves, and a staging folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def site(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    d.mkdir()
    return d


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return tmp_path / "staging"

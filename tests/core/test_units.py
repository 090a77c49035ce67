"""Sizes and shares as a job file writes them."""

from __future__ import annotations

import pytest

from etl.core.units import parse_share, parse_size


@pytest.mark.parametrize(
    "text, size",
    [("4GiB", 4 * 2**30), ("300 MiB", 300 * 2**20), ("1.5GB", 1_500_000_000), ("512", 512), ("2kib", 2048)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_bad_size_names_the_value() -> None:
    with pytest.raises(ValueError, match="expected a size.*'lots'"):
        parse_size("lots")


def test_shares() -> None:
    assert parse_share("50%") == 0.5
    assert parse_share(" 1% ") == 0.01
    assert parse_share(0.25) == 0.25
    with pytest.raises(ValueError, match="expected a share.*'many%'"):
        parse_share("many%")

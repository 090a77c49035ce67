"""Values with units as a job file writes them: byte sizes and shares.

``parse_size("64MiB")`` gives bytes (``KB``/``MB``/… are powers of 10, ``KiB``/``MiB``/…
powers of 2, a bare number is bytes); ``parse_share("5%")`` gives 0.05. Both raise
``ValueError`` naming the value, which the config models turn into a ``ConfigError``
naming the key and the file. Plain functions on plain values: no pydantic, no I/O.
"""

from __future__ import annotations

import re
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"4GiB"`` → 4294967296. Raises ValueError naming the value."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected a size like '512MiB' or '4GiB', got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def parse_share(v: Any) -> Any:
    """``"50%"`` → 0.5; a plain number is already a share (0.5) and is returned as it is."""
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            return float(v.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"expected a share like '5%' or 0.05, got {v!r}") from None
    return v

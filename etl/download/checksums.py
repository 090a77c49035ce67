"""Checksums of staged files: hashers per source, digest checks, hashed writes.

A source always gets a sha256 hasher, and an md5 one when it declares ``md5``;
``checksum_problem`` compares the digests with the source's expected values. The file
helpers here are blocking: the download stage runs them in a thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from etl.core.records import Source


def new_hashers(src: Source) -> dict[str, Any]:
    hashers: dict[str, Any] = {"sha256": hashlib.sha256()}
    if src.md5:
        hashers["md5"] = hashlib.md5(usedforsecurity=False)
    return hashers


def checksum_problem(src: Source, digests: Mapping[str, Any]) -> str | None:
    for algo in ("sha256", "md5"):
        expected = getattr(src, algo)
        if expected and (actual := digests[algo]) != expected:
            return f"{algo} mismatch: expected {expected}, got {actual}"
    return None


def hexdigests(hashers: Mapping[str, Any]) -> dict[str, str]:
    return {name: h.hexdigest() for name, h in hashers.items()}


def hash_file(path: Path, hashers: dict[str, Any], limit: int | None = None) -> int:
    """Feed the first ``limit`` bytes (all when None) of ``path`` to ``hashers``; returns the size read."""
    size = 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            block = f.read(1 << 20 if limit is None else min(1 << 20, limit - size))
            if not block:
                break
            for h in hashers.values():
                h.update(block)
            size += len(block)
    return size


def write_and_hash(f: IO[bytes], data: bytes | bytearray, hashers: dict[str, Any]) -> None:
    if data:
        f.write(data)
        for h in hashers.values():
            h.update(data)

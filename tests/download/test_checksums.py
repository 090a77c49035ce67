"""Checksums of staged files: hashers per source, the mismatch message, hashing files and writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from etl.core.records import Source
from etl.download.checksums import (
    checksum_problem,
    hash_file,
    hexdigests,
    new_hashers,
    write_and_hash,
)

DATA = b"trip_id,fare\n" + b"".join(f"{i},{i * 1.5}\n".encode() for i in range(50_000))
SHA = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()


def source(sha256: str | None = None, md5: str | None = None) -> Source:
    return Source(0, "https://h/a.csv", "a.csv", "csv", sha256=sha256, md5=md5)


def test_every_source_gets_sha256_and_md5_only_when_declared() -> None:
    assert set(new_hashers(source())) == {"sha256"}
    assert set(new_hashers(source(md5=MD5))) == {"sha256", "md5"}
    assert set(new_hashers(source(sha256=SHA))) == {"sha256"}


def testhash_file_matches_hashlib_and_returns_the_size(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(DATA * 3)  # several 1 MiB blocks
    hashers = new_hashers(source(md5="x"))
    assert hash_file(path, hashers) == 3 * len(DATA)
    assert hexdigests(hashers) == {
        "sha256": hashlib.sha256(DATA * 3).hexdigest(),
        "md5": hashlib.md5(DATA * 3).hexdigest(),
    }


def testhash_file_with_a_limit_hashes_only_the_prefix(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(DATA)
    for limit in (0, 1, 1000, len(DATA), len(DATA) + 10):
        hashers = new_hashers(source())
        got = hash_file(path, hashers, limit=limit)
        assert got == min(limit, len(DATA))
        assert hexdigests(hashers)["sha256"] == hashlib.sha256(DATA[:limit]).hexdigest()


def testhash_file_of_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    hashers = new_hashers(source())
    assert hash_file(tmp_path / "e", hashers) == 0
    assert hexdigests(hashers)["sha256"] == hashlib.sha256(b"").hexdigest()


def test_a_file_written_in_pieces_hashes_like_the_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.part"
    hashers = new_hashers(source(md5="x"))
    f = open(path, "wb")
    for i in range(0, len(DATA), 7919):
        write_and_hash(f, bytearray(DATA[i : i + 7919]), hashers)
    write_and_hash(f, b"", hashers)  # an empty read from the socket changes nothing
    f.close()
    assert path.read_bytes() == DATA
    assert hexdigests(hashers) == {"sha256": SHA, "md5": MD5}


def test_matchinghexdigests_are_no_problem() -> None:
    digests = {"sha256": SHA, "md5": MD5}
    assert checksum_problem(source(sha256=SHA, md5=MD5), digests) is None
    assert checksum_problem(source(), {"sha256": SHA}) is None  # nothing declared: nothing to compare


def test_a_sha256_mismatch_names_the_algorithm_and_bothhexdigests() -> None:
    wrong = "f" * 64
    problem = checksum_problem(source(sha256=wrong), {"sha256": SHA})
    assert problem == f"sha256 mismatch: expected {wrong}, got {SHA}"


def test_an_md5_mismatch_is_reported_when_sha256_matches() -> None:
    problem = checksum_problem(source(sha256=SHA, md5="0" * 32), {"sha256": SHA, "md5": MD5})
    assert problem is not None and problem.startswith("md5 mismatch") and MD5 in problem

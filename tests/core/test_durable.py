"""etl.core.durable: files written whole or not at all, on a real filesystem."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from etl.core import durable
from etl.core.durable import (
    TEMP_SUFFIX,
    close_synced,
    fsync_dir,
    fsync_tree,
    promote,
    replacing,
    write_bytes,
    write_json,
)


class Boom(Exception):
    pass


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def perms(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------- replace / create


def test_write_bytes_creates_file_and_missing_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "state.bin"
    write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert listing(target.parent) == ["state.bin"]


def test_write_bytes_replaces_old_content_with_a_new_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old content, longer than the new one")
    old_inode = target.stat().st_ino
    with target.open("rb") as reader_of_old:
        write_bytes(target, b"new", sync_folder=True)
        # A rename, not an in-place rewrite: a reader that opened the old file still sees it whole.
        assert reader_of_old.read() == b"old content, longer than the new one"
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != old_inode
    assert listing(tmp_path) == ["manifest.json"]


def test_write_json_round_trips_and_uses_str_for_paths(tmp_path: Path) -> None:
    target = tmp_path / "sources.json"
    data = {"b": 1, "a": [1, 2], "where": tmp_path / "x"}
    write_json(target, data, sort_keys=True, indent=None)
    text = target.read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1, "where": str(tmp_path / "x")}
    assert text.index('"a"') < text.index('"b"')  # sort_keys honoured
    assert "\n" not in text  # indent=None: one line
    write_json(target, [1])
    assert target.read_text() == "[\n  1\n]"  # default indent 2
    assert listing(tmp_path) == ["sources.json"]


# --------------------------------------------------------------- failure mid-write


def test_replacing_leaves_target_intact_and_no_temp_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_bytes(b"previous")
    with pytest.raises(Boom), replacing(target) as f:
        f.write(b"half of the new conte")
        f.flush()
        raise Boom()
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["report.json"]


def test_replacing_removes_temp_on_base_exception(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt), replacing(target) as f:
        f.write(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["report.json"]


def test_replacing_failure_without_previous_file_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(Boom), replacing(target) as f:
        f.write(b"x" * 100_000)
        raise Boom()
    assert listing(tmp_path) == []


def test_write_bytes_with_data_that_cannot_be_written_leaves_target_intact(tmp_path: Path) -> None:
    target = tmp_path / "part.parquet"
    target.write_bytes(b"previous")
    with pytest.raises(TypeError):
        write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["part.parquet"]


class Unprintable:
    def __str__(self) -> str:
        raise Boom("cannot be shown")


def test_write_json_failure_leaves_target_intact(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    write_json(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(Boom):
        write_json(target, {"version": 2, "bad": Unprintable()})
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError):
        write_json(target, circular)
    assert target.read_bytes() == before
    assert listing(tmp_path) == ["manifest.json"]


# ----------------------------------------------------------------------- temp names


def test_temp_file_is_hidden_beside_target_and_target_unchanged_until_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "data.csv"
    target.write_bytes(b"old")
    with replacing(target) as f:
        f.write(b"new")
        f.flush()
        temps = [name for name in listing(tmp_path) if name != "data.csv"]
        assert len(temps) == 1
        (temp,) = temps
        assert temp.startswith(".") and temp.endswith(TEMP_SUFFIX)
        assert temp.startswith(".data.csv.")
        assert (tmp_path / temp).read_bytes() == b"new"
        assert target.read_bytes() == b"old"  # not replaced before the block ends
    assert TEMP_SUFFIX == ".tmp"
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["data.csv"]


# ---------------------------------------------------------------------------- modes


def test_mode_is_honoured(tmp_path: Path) -> None:
    for mode in (0o600, 0o640, 0o644, 0o604):
        target = tmp_path / f"f{mode:o}"
        write_bytes(target, b"x", mode=mode)
        assert perms(target) == mode
    target = tmp_path / "j.json"
    write_json(target, {}, mode=0o640)
    assert perms(target) == 0o640
    with replacing(tmp_path / "r", mode=0o620) as f:
        f.write(b"r")
    assert perms(tmp_path / "r") == 0o620


def test_mode_replaces_old_files_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_bytes(target, b"1", mode=0o600)
    write_bytes(target, b"2", mode=0o644)
    assert perms(target) == 0o644


def test_default_mode_follows_this_process_umask(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_bytes(target, b"x")
    assert perms(target) == 0o666 & ~current_umask()  # not mkstemp's 0600


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_default_mode_follows_the_umask_the_process_started_with(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "f"
    code = (
        "import os, sys\n"
        f"os.umask({umask:#o})\n"
        "from pathlib import Path\n"
        "from etl.core.durable import write_bytes, write_json\n"
        "write_bytes(Path(sys.argv[1]), b'x')\n"
        "write_json(Path(sys.argv[1] + '.json'), {})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, timeout=60)
    assert perms(target) == 0o666 & ~umask
    assert perms(tmp_path / "f.json") == 0o666 & ~umask


# ---------------------------------------------------------------------- atomicity


def test_concurrent_readers_see_old_or_new_content_never_a_mix(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    size = 256 * 1024
    versions = [bytes([65 + i]) * size for i in range(4)]
    write_bytes(target, versions[0])
    seen: list[bytes] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read_loop() -> None:
        try:
            while True:  # at least one read, then until the writer is done
                seen.append(target.read_bytes())
                if done.is_set():
                    return
        except BaseException as e:  # surfaced below
            errors.append(e)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for i in range(40):
            write_bytes(target, versions[i % len(versions)])
    finally:
        done.set()
        reader.join(timeout=30)
    assert not errors
    assert seen
    assert all(data in versions for data in seen)
    assert listing(tmp_path) == ["big.bin"]


# ------------------------------------------------------------------------ promote


def test_promote_renames_partial_to_final(tmp_path: Path) -> None:
    partial = tmp_path / "trips.csv.part"
    final = tmp_path / "trips.csv"
    partial.write_bytes(b"downloaded")
    promote(partial, final)
    assert final.read_bytes() == b"downloaded"
    assert not partial.exists()
    assert listing(tmp_path) == ["trips.csv"]


def test_promote_replaces_an_existing_final(tmp_path: Path) -> None:
    partial = tmp_path / "trips.csv.part"
    final = tmp_path / "trips.csv"
    final.write_bytes(b"old")
    partial.write_bytes(b"new")
    inode = partial.stat().st_ino
    promote(partial, final)
    assert final.read_bytes() == b"new"
    assert final.stat().st_ino == inode  # renamed, not copied
    assert listing(tmp_path) == ["trips.csv"]


def test_promote_of_missing_partial_raises_and_keeps_final(tmp_path: Path) -> None:
    final = tmp_path / "trips.csv"
    final.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        promote(tmp_path / "missing.part", final)
    assert final.read_bytes() == b"old"


# ----------------------------------------------------------------------- helpers


def test_close_synced_flushes_and_closes(tmp_path: Path) -> None:
    path = tmp_path / "stream.part"
    f = path.open("wb")
    f.write(b"buffered bytes")
    close_synced(f)
    assert f.closed
    assert path.read_bytes() == b"buffered bytes"


def test_fsync_dir_and_tree_accept_real_folders_and_reject_missing(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    fsync_dir(tmp_path)
    fsync_tree(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


def test_module_umask_matches_process_umask() -> None:
    assert durable._UMASK == current_umask()


def test_a_file_sent_to_disk_as_it_grows_keeps_every_byte(tmp_path: Path) -> None:
    """``start_writeback`` between writes (the output writer calls it after each row group)
    drops pages already written from the cache: what is read back must still be whole."""
    path = tmp_path / "grown.bin"
    blocks = [os.urandom(300_000) for _ in range(5)]
    with open(path, "wb") as f:
        for block in blocks:
            f.write(block)  # still in the file object's buffer: start_writeback flushes it
            durable.start_writeback(f)
        durable.close_synced(f)
    assert path.read_bytes() == b"".join(blocks)


def test_start_writeback_on_a_closed_file_raises() -> None:
    f = open(os.devnull, "wb")
    f.close()
    with pytest.raises(ValueError):
        durable.start_writeback(f)

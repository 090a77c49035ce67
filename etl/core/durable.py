"""Files written whole or not at all: the one way this project puts a finished file on disk.

Every writer follows the same rule: write to a temp file *beside* the target (same folder,
so the rename is atomic), fsync it, then ``os.replace`` it over the target; readers see
the old file or the new one, never half of one. Where a crash must not lose the rename
itself (a published file, a staged download), the folder is fsynced too. A failed write
removes its temp file. Temp names start with ``.`` and end with ``.tmp``, so a reader
listing the folder skips them and ``write.folder``'s clean-up recognises them.

Used for the state files (manifest, sources.json, reports), output parts, staged
downloads, metrics textfiles and generated data.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"
PRIVATE_MODE = 0o600  # state files, reports, logs and staged downloads: readable by the owner only
PRIVATE_DIR_MODE = 0o700  # the state folder: its files may name sources and hold their data


@contextmanager
def replacing(
    path: Path, *, mode: int | None = None, sync_folder: bool = False, sync: bool = True
) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` when the block
    ends without an error, and is removed otherwise. ``mode``: permission bits for the new
    file (default: the umask's); ``sync_folder``: also fsync the folder after the rename;
    ``sync=False``: atomic but not fsynced (a file that only has to outlive the process)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_dir(path.parent)


def write_bytes(
    path: Path, data: bytes, *, mode: int | None = None, sync_folder: bool = False, sync: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring);
    ``sync=False``: atomically only."""
    with replacing(path, mode=mode, sync_folder=sync_folder, sync=sync) as f:
        f.write(data)


def write_json(path: Path, data: Any, *, mode: int | None = None, indent: int = 2, sort_keys: bool = False) -> None:
    """``data`` as JSON (``default=str`` for paths and dates), written like ``write_bytes``."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=str)
    write_bytes(path, text.encode(), mode=mode)


def promote(partial: Path, final: Path) -> None:
    """Rename a finished, fsynced ``partial`` file (a download streamed to ``.part``) to
    ``final`` and fsync the folder, so the rename survives a crash."""
    os.replace(partial, final)
    fsync_dir(final.parent)


def start_writeback(f: IO[bytes]) -> None:
    """Start writing what ``f`` holds to the disk, without waiting for it, so that a later
    fsync has little left to do. ``POSIX_FADV_DONTNEED`` starts the writeback of the file's
    dirty pages and drops its clean ones (pages written before the last call): nothing of
    the file is read back. A no-op where the call does not exist (macOS)."""
    f.flush()
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def close_synced(f: IO[bytes]) -> None:
    """Flush, fsync and close a file being streamed to."""
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so the renames and creations inside it are on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every folder under ``root``."""
    for folder, _, _ in os.walk(root):
        fsync_dir(Path(folder))


def _read_umask() -> int:
    """The process umask, read by setting and restoring it (there is no getter): done once,
    at import, because a thread creating a file in between would get the wrong mode."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()

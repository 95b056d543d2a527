"""Atomic file replacement: a reader sees the old file or the whole new one, never a mix.

The new bytes go to a temp file in the same directory (so the rename never crosses a
filesystem), are fsynced, and ``os.replace`` swaps them in. A process killed at any point leaves
either the old file or the new one under the real name, plus at most a temp file, which
``is_temp_file`` recognises so that owners of a directory can sweep leftovers on start.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path_for(path: Path) -> Path:
    """A fresh temp name next to ``path``: hidden, unique per process and call, ending in .tmp."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_file(name: str) -> bool:
    """True for a name ``temp_path_for`` makes (a leftover of an interrupted write)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is written (a short write is legal). Tests replace this to
    simulate a full disk or a kill mid-write."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes | memoryview, *, fsync: bool = True, durable_rename: bool = False, mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data`` atomically.

    fsync: flush the temp file before the rename, so even a power loss never leaves a short file
    under the real name (a killed process cannot: the page cache survives it).
    durable_rename: also fsync the directory, so the new file survives a power loss.
    mode: the new file's permission bits (before the umask).
    On any error the temp file is removed and the OSError propagates; ``path`` is untouched.
    """
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable_rename:
        fsync_dir(path.parent)

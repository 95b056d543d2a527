"""write_atomically: the old file or the whole new one, never a mix, no temp file left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from radixserve import atomic_file
from radixserve.atomic_file import is_temp_file, temp_path_for, write_atomically


def test_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")
    write_atomically(path, b"new contents", durable_rename=True)
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_file, "_write_all", half_then_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, b"new contents that do not fit")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_temp_names_are_recognised_and_unique(tmp_path: Path) -> None:
    path = tmp_path / "ab.kv"
    a, b = temp_path_for(path), temp_path_for(path)
    assert a != b and a.parent == tmp_path
    assert is_temp_file(a.name) and not is_temp_file(path.name) and not is_temp_file("x.tmp")

"""StateFile: atomic saves; a missing, corrupt or foreign file loads as empty, never raises."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from radixserve import atomic_file
from radixserve.state_file import StateFile

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE = {"caches": [{"name": "caches/abc", "expire_time": 1_900_000_000.5, "token_ids": [1, 2, 3]}], "pins": []}


def test_save_then_load_in_a_new_object(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    assert StateFile(path).save(STATE)
    assert StateFile(path).load() == STATE
    envelope = json.loads(path.read_text())
    assert envelope["format"] == "radixserve-state" and envelope["version"] == 1 and envelope["data"] == STATE
    assert os.listdir(path.parent) == ["state.json"]


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "nope.json").load() == {}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"format": "radixserve-state", "version": 1, "data": {"caches": [', id="truncated"),
        pytest.param(b"\xff\xfe garbage", id="binary"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"format": "something-else", "version": 1, "data": {}}', id="foreign"),
        pytest.param(b'{"format": "radixserve-state", "version": 99, "data": {}}', id="newer-version"),
        pytest.param(b'{"format": "radixserve-state", "version": 1, "data": [1]}', id="data-not-an-object"),
    ],
)
def test_bad_file_is_logged_set_aside_and_empty(tmp_path: Path, content: bytes, caplog) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    state = StateFile(path)
    with caplog.at_level(logging.WARNING, logger="radixserve.state"):
        assert state.load() == {}
    assert "starting empty" in caplog.text and str(path) in caplog.text
    assert not path.exists() and state.corrupt_path.read_bytes() == content
    assert state.save(STATE) and state.load() == STATE  # and life goes on


def test_failed_save_keeps_previous_state(tmp_path: Path, monkeypatch, caplog) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    state.save(STATE)

    def disk_full(fd: int, data) -> None:
        os.write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_file, "_write_all", disk_full)
    with caplog.at_level(logging.ERROR, logger="radixserve.state"):
        assert state.save({"caches": []}) is False
    assert "save failed" in caplog.text
    assert StateFile(path).load() == STATE and os.listdir(tmp_path) == ["state.json"]


def test_unserialisable_data_is_a_caller_bug(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        StateFile(tmp_path / "s.json").save({"x": object()})
    with pytest.raises(ValueError):
        StateFile(tmp_path / "s.json").save({"x": float("nan")})


KILL_MID_SAVE = textwrap.dedent(
    """
    import os, sys, time
    from radixserve import atomic_file
    from radixserve.state_file import StateFile

    state = StateFile(sys.argv[1])
    state.save({"generation": 1})

    def stall(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        print("half-written", flush=True)
        time.sleep(60)

    atomic_file._write_all = stall
    state.save({"generation": 2})
    """
)


def test_kill_mid_save_leaves_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", KILL_MID_SAVE, str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "half-written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert len(list(tmp_path.glob("*.tmp"))) == 1  # the interrupted save, under a temp name
    assert StateFile(path).load() == {"generation": 1}
    assert os.listdir(tmp_path) == ["state.json"]  # load swept it


SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    from radixserve.state_file import StateFile

    state = StateFile(sys.argv[1])
    generation = state.load().get("generation", 0)
    while True:
        generation += 1
        caches = [{"id": f"c{i}", "turns": [{"role": "system", "blocks": ["x" * 2000]}]} for i in range(generation % 50)]
        assert state.save({"generation": generation, "named_caches": caches})
        print(generation, flush=True)  # acknowledged: on disk
    """
)


def test_kill_9_in_a_loop_never_loses_an_acknowledged_save(tmp_path: Path) -> None:
    """The server's pattern (save, then answer the client), SIGKILLed at random moments 15 times:
    every start loads a whole file holding at least the last acknowledged save."""
    import random
    import threading

    path = tmp_path / "server-state.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    rng = random.Random(13)
    acknowledged = 0
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True,
                                env=env)
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.extend(int(line) for line in proc.stdout), daemon=True)
        reader.start()
        while not seen:  # at least one save per round, so the rounds make progress
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()
        acknowledged = max([acknowledged, *seen])
        state = StateFile(path)
        data = state.load()
        assert data["generation"] >= acknowledged
        assert len(data["named_caches"]) == data["generation"] % 50
        assert not state.corrupt_path.exists()

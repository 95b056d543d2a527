"""Warm restart with real `radixserve serve` processes: SIGTERM, then kill -9 while caches are
being created, over one --state-dir. Every named cache whose create returned 200 is there after
each restart; the state file always loads (nothing is set aside); no process crashes on start.
Three model loads in subprocesses: minutes on a 2-core box, hence slow. (StateFile itself is
killed mid-save in a loop in tests/test_state_file.py.)
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from radixserve.server.persistence import STATE_FILE_NAME
from tests.live_server import wait_until_healthy
from tests.server.conftest import LONG_SYSTEM

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "sk-alice", "sk-bob"
PIN_DOC = LONG_SYSTEM.replace("Hotel Aurora", "Hotel Process")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `radixserve serve` process on a free port over `state_dir`."""

    def __init__(self, state_dir: Path, log_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radixserve", "serve", "--port", str(self.port), "--state-dir", str(state_dir),
             "--num-blocks", "512", "--min-cacheable-tokens", "16", "--api-key", ALICE, "--api-key", BOB,
             "--log-level", "info"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        wait_until_healthy(self.base, self.proc, self.log, poll=0.3)

    def log(self) -> str:
        return self.log_path.read_text()

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"x-api-key": key}, timeout=120)

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self._log.close()
        return code


def _create(http: httpx.Client, text: str) -> str | None:
    try:
        r = http.post("/v1/caches", json={"model": "embedded", "system": text, "ttl": "3600s"})
    except httpx.HTTPError:
        return None
    return r.json()["name"] if r.status_code == 200 else None


def _create_until_killed(server: Server, round_no: int, acknowledged: list[str]) -> None:
    """Create caches from a thread; SIGKILL the server at a random moment meanwhile."""
    stop = threading.Event()

    def loop() -> None:
        with server.http(ALICE) as http:
            i = 0
            while not stop.is_set():
                name = _create(http, f"{LONG_SYSTEM} Round {round_no}, cache {i}.")
                if name is not None:
                    acknowledged.append(name)
                i += 1

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    time.sleep(random.Random(round_no).uniform(1.5, 4.0))
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    stop.set()
    worker.join(timeout=120)


def test_restart_after_sigterm_and_after_kill_9(tmp_path: Path):
    state_dir = tmp_path / "state"

    # 1. a named cache and a 1h cache_control pin, then SIGTERM
    a = Server(state_dir, tmp_path / "a.log")
    try:
        cache = a.http(ALICE).post("/v1/caches", json={"model": "embedded", "system": LONG_SYSTEM, "ttl": "3600s"})
        assert cache.status_code == 200, cache.text
        cache = cache.json()
        pinned = anthropic.Anthropic(base_url=a.base, api_key=ALICE, max_retries=0).messages.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "Is there a gym?"}],
            system=[{"type": "text", "text": PIN_DOC, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        ).usage.cache_creation_input_tokens
        assert pinned > 32
    finally:
        assert a.stop(signal.SIGTERM) in (0, -signal.SIGTERM), a.log()
    assert "Traceback" not in a.log()

    # 2. a new process: the name resolves for its owner only; after its first use it is read from the cache
    b = Server(state_dir, tmp_path / "b.log")
    acknowledged: list[str] = []
    try:
        assert b.http(ALICE).get(f"/v1/{cache['name']}").json()["expire_time"] == cache["expire_time"]
        assert b.http(BOB).get(f"/v1/{cache['name']}").status_code == 404
        client = openai.OpenAI(base_url=f"{b.base}/v1", api_key=ALICE, max_retries=0, timeout=120)
        for _ in range(2):
            use = client.chat.completions.create(
                model="embedded", max_tokens=1, extra_body={"cached_content": cache["name"]},
                messages=[{"role": "user", "content": "When is breakfast?"}])
        assert use.usage.prompt_tokens_details.cached_tokens >= cache["usage_metadata"]["total_token_count"] - 16
        again = anthropic.Anthropic(base_url=b.base, api_key=ALICE, max_retries=0).messages.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "Is there a sauna?"}],
            system=[{"type": "text", "text": PIN_DOC, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        )
        assert again.usage.cache_read_input_tokens >= pinned - 16
        # 3. kill -9 while caches are being created
        _create_until_killed(b, 1, acknowledged)
    finally:
        if b.proc.poll() is None:
            b.stop(signal.SIGKILL)
    assert acknowledged, "no cache was created before the kill"

    c = Server(state_dir, tmp_path / "c.log")
    try:
        for name in [cache["name"], *acknowledged]:
            assert c.http(ALICE).get(f"/v1/{name}").status_code == 200, name
        listed = {x["name"] for x in c.http(ALICE).get("/v1/caches").json()["cached_contents"]}
        assert {cache["name"], *acknowledged} <= listed
    finally:
        c.stop(signal.SIGTERM)
    for log in ("b.log", "c.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and "cannot be loaded" not in text, text
    assert not (state_dir / (STATE_FILE_NAME + ".corrupt")).exists()
    assert [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")] == []  # leftovers swept at start

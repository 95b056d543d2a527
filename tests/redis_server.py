"""A real redis-server (or valkey-server) for tests, on a free loopback port, killable and restartable.

    from tests.redis_server import redis_server  # the fixture: a fresh server per test

scripts/setup-venv.sh installs redis-server from the Debian packages; a test using the fixture is
skipped only if neither executable can be found.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import free_port


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


class RedisServer:
    """One server process on 127.0.0.1:port, no persistence (a restart starts empty)."""

    def __init__(self, executable: str, port: int | None = None, workdir: str | None = None) -> None:
        self.executable = executable
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="redis-test-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self, *extra: str, timeout_s: float = 10.0) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        assert self.proc is None, "already running"
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", str(self.workdir), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"redis-server exited at start:\n{(self.workdir / 'redis.log').read_text()[-2000:]}")
            try:
                if self.client().ping():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {timeout_s} s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, its data with it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but never answers (a hung or partitioned host)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused process ignores SIGTERM until resumed
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, running redis-server for one test (stopped and removed at the end)."""
    executable = find_redis_server()
    if executable is None:
        pytest.skip("redis-server not found (scripts/setup-venv.sh installs it: apt-get install redis-server)")
    server = RedisServer(executable)
    try:
        server.start()
        yield server
    finally:
        server.close()

"""Serving an app for real in tests: uvicorn in a background thread on a free loopback port, or
waiting for a `radixserve serve` subprocess to answer /health."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1, for a server a test starts in another process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Serve an ASGI app on a free 127.0.0.1 port until the block exits; yields the base URL."""
    import uvicorn

    from radixserve.server.http_protocol import JSONErrorH11Protocol

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; handing uvicorn the socket avoids races
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                           http=JSONErrorH11Protocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until_healthy(base_url: str, proc: subprocess.Popen, log: Callable[[], str], timeout: float = 300,
                       poll: float = 0.5) -> None:
    """Block until the server process at base_url answers /health with 200; fail with its log if
    it exits first or does not come up within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log()
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(poll)

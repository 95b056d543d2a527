"""Fixtures: real radixserve servers (uvicorn on a free loopback port, in this process) over the
embedded model, one with prefix caching and one without, for the load generator and the suite."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from radixserve.server import ServerConfig, create_app


@contextmanager
def serve(engine) -> Iterator[str]:
    """Serve an LLMEngine on a free 127.0.0.1 port until the block exits; yields the base URL."""
    import uvicorn

    app = create_app(engine, ServerConfig())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks the port; handing uvicorn the socket avoids races
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"bench-{port}")
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


@pytest.fixture(scope="module")
def bench_servers(embedded_model) -> Iterator[dict[str, str]]:
    """{"on": url, "off": url}: the embedded model with prefix caching on and off."""
    from radixserve.config import CacheConfig, EngineConfig, ModelConfig
    from radixserve.engine import LLMEngine

    def engine(caching: bool) -> LLMEngine:
        config = EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                              cache=CacheConfig(num_blocks=512, enable_prefix_caching=caching))
        return LLMEngine(config, loaded=embedded_model)

    with serve(engine(True)) as on, serve(engine(False)) as off:
        yield {"on": on, "off": off}

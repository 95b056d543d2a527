"""Fixtures: real radixserve servers (uvicorn on a free loopback port, in this process) over the
embedded model, one with prefix caching and one without, for the load generator and the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from radixserve.server import ServerConfig, create_app
from tests.live_server import serve_app


@pytest.fixture(scope="module")
def bench_servers(embedded_model) -> Iterator[dict[str, str]]:
    """{"on": url, "off": url}: the embedded model with prefix caching on and off."""
    from radixserve.config import CacheConfig, EngineConfig, ModelConfig
    from radixserve.engine import LLMEngine

    def app(caching: bool):
        config = EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                              cache=CacheConfig(num_blocks=512, enable_prefix_caching=caching))
        return create_app(LLMEngine(config, loaded=embedded_model), ServerConfig())

    with serve_app(app(True)) as on, serve_app(app(False)) as off:
        yield {"on": on, "off": off}

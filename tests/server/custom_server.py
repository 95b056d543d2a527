"""A live server over the embedded model with any CacheConfig options (start_server takes only
num_blocks): quotas, pin bounds, caching off, ..."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from radixserve.config import CacheConfig, EngineConfig, ModelConfig
from radixserve.server import ServerConfig, create_app
from tests.live_server import serve_app
from tests.server.conftest import RunningServer


class CustomServer:
    """base_url, engine and the official clients of a server started by `custom_server`."""

    api_key = None
    openai = RunningServer.openai
    anthropic = RunningServer.anthropic

    def __init__(self, base_url: str, engine) -> None:
        self.base_url, self.engine = base_url, engine


@contextmanager
def custom_server(loaded, config: ServerConfig, **cache_options) -> Iterator[CustomServer]:
    from radixserve.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(**cache_options)), loaded=loaded)
    with serve_app(create_app(engine, config)) as base_url:
        yield CustomServer(base_url, engine)

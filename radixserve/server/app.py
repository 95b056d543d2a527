"""create_app: the FastAPI application over one LLMEngine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from radixserve.config import EngineConfig
from radixserve.engine import LLMEngine
from radixserve.server import admin_api, anthropic_api, caches_api, openai_api
from radixserve.server.config import ServerConfig
from radixserve.server.errors import install_error_handlers
from radixserve.server.state import ServerState


def create_app(engine_or_config: LLMEngine | EngineConfig | None = None, config: ServerConfig | None = None) -> FastAPI:
    """Build the app. Give an LLMEngine to serve it (tests share one loaded model this way) or
    an EngineConfig to build one (loads the model now, before the server listens).

    The engine thread starts and stops with the app's lifespan; an engine must be served by
    one app at a time.
    """
    config = config or ServerConfig()
    if isinstance(engine_or_config, LLMEngine):
        engine = engine_or_config
    else:
        engine = LLMEngine(engine_or_config or EngineConfig())
    state = ServerState(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.async_engine.start()
        sweeper = asyncio.create_task(state.caches.run_sweeper(config.cache_sweep_interval))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await state.async_engine.stop()
            if state.request_log is not None:
                state.request_log.close()

    app = FastAPI(title="radixserve", summary="LLM inference with automatic prefix caching", lifespan=lifespan)
    app.state.radixserve = state
    install_error_handlers(app)
    for module in (openai_api, anthropic_api, caches_api, admin_api):
        app.include_router(module.router)
    return app

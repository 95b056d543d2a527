"""create_app: the FastAPI application over one LLMEngine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from radixserve.config import EngineConfig
from radixserve.engine import LLMEngine
from radixserve.server import admin_api, anthropic_api, caches_api, openai_api, shared_prefix_api
from radixserve.server.async_engine import AsyncEngine
from radixserve.server.config import ServerConfig
from radixserve.server.engine_client import EngineClient
from radixserve.server.errors import install_error_handlers
from radixserve.server.state import ServerState, get_state

log = logging.getLogger("radixserve.server")


def create_app(engine_or_config: LLMEngine | EngineConfig | None = None, config: ServerConfig | None = None) -> FastAPI:
    """Build the app. Give an LLMEngine to serve it (tests share one loaded model this way) or
    an EngineConfig to build one (loads the model now, before the server listens).

    The engine runs on a thread of this process, or in a process of its own (the engine core,
    with config.engine_process; it needs an EngineConfig, since a built engine cannot move). It
    starts and stops with the app's lifespan; an engine must be served by one app at a time.
    """
    config = config or ServerConfig()
    state = ServerState(_engine_client(engine_or_config, config), config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for level, line in security_summary(state):
            log.log(level, "%s", line)
        state.keeper.restore()  # before listening: a restored cache name resolves from the first request
        state.async_engine.start()
        state.keeper.start()
        await shared_prefix_api.publish_files(state, config.shared_prefix_files)
        sweeper = asyncio.create_task(state.caches.run_sweeper(config.cache_sweep_interval))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await state.keeper.close()  # the last save reads the pins, so before the engine stops
            await state.async_engine.stop()
            # the engine no longer steps: write the prefix cache down to the KV store, if any
            await state.async_engine.close()
            if state.request_log is not None:
                state.request_log.close()

    # With keys configured the API description is not public either: the built-in /openapi.json,
    # /docs and /redoc are replaced by routes that authenticate first.
    keyed = state.auth.enabled
    app = FastAPI(title="radixserve", summary="LLM inference with automatic prefix caching", lifespan=lifespan,
                  **({"openapi_url": None, "docs_url": None, "redoc_url": None} if keyed else {}))
    app.state.radixserve = state
    install_error_handlers(app)
    for module in (openai_api, anthropic_api, caches_api, admin_api, shared_prefix_api):
        app.include_router(module.router)
    if keyed:
        _add_keyed_docs(app)
    return app


def _engine_client(engine_or_config: LLMEngine | EngineConfig | None, config: ServerConfig) -> EngineClient:
    if isinstance(engine_or_config, LLMEngine):
        if config.engine_process == "on":
            raise ValueError("engine_process='on' needs an EngineConfig: a built LLMEngine cannot move to another process")
        return AsyncEngine(engine_or_config)
    engine_config = engine_or_config or EngineConfig()
    if config.uses_engine_process:
        try:
            from radixserve.server.engine_process import EngineProcessClient  # pyzmq, msgspec
        except ImportError as e:
            if config.engine_process == "on":
                raise
            # auto: an environment without the channel's packages still serves, as before
            log.warning("engine process unavailable (%s): the engine runs on a thread of this process", e)
        else:
            return EngineProcessClient.launch(engine_config, log_level=config.log_level, spin_count=config.engine_spin_count)
    return AsyncEngine(LLMEngine(engine_config))


def _add_keyed_docs(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        get_state(request).auth.authenticate(request)
        return JSONResponse(app.openapi())

    # The pages load /openapi.json from the browser, which sends no key: a tool that sends the
    # header (or a browser extension adding it) can use them; `curl -H` on /openapi.json always works.
    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        get_state(request).auth.authenticate(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="radixserve - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        get_state(request).auth.authenticate(request)
        return get_redoc_html(openapi_url="/openapi.json", title="radixserve - ReDoc")


def security_summary(state: ServerState) -> list[tuple[int, str]]:
    """What the startup log says about tenancy: which cache mode runs, and who may do what.
    A shared cache across several keys is a warning: tenants can probe each other's prompts."""
    config, auth = state.config, state.auth
    lines: list[tuple[int, str]] = []
    num_keys = len(set(config.api_keys) | set(config.admin_keys))
    if not state.prefix_caching:
        lines.append((logging.INFO, "prefix cache: OFF (--no-prefix-caching): nothing is shared between requests"))
    elif not auth.enabled:
        lines.append((logging.INFO,
                      "prefix cache: SHARED, no API keys: every caller is one tenant and can tell by time to first "
                      "token and usage.cached_tokens whether a prompt prefix was sent before; /reset_prefix_cache "
                      "and /metrics are open (fine for one user on loopback; for several tenants use --api-key with "
                      "--cache-isolation per-key)"))
    elif not auth.isolated:
        lines.append((logging.WARNING,
                      f"prefix cache: SHARED across {num_keys} API keys: one tenant can detect another's prompt "
                      "prefixes by time to first token and usage.cached_tokens; pass --cache-isolation per-key "
                      "(alias --namespace-from-api-key) to give each key its own cache"))
    else:
        lines.append((logging.INFO,
                      f"prefix cache: ISOLATED per API key ({num_keys} keys): a tenant never reads another's cached "
                      "blocks (cache_salt splits a tenant further)"))
    if auth.enabled:
        admin = (f"{len(set(config.admin_keys))} admin key(s)" if config.admin_keys
                 else "no admin key, so nobody may reset the prefix cache over HTTP")
        metrics = "behind --metrics-key" if auth.metrics_protected else "open (--metrics-key puts it behind a key)"
        lines.append((logging.INFO, f"operator routes: {admin}; /metrics {metrics}; /openapi.json and /docs need a key"))
    if auth.default_cache_policy.value != "read_write" or config.key_cache_policies:
        lines.append((logging.INFO, f"cache policy: default {auth.default_cache_policy.value}, "
                                    f"{len(config.key_cache_policies)} key(s) with their own"))
    return lines

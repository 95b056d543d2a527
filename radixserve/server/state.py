"""ServerState: what every route needs (engine, config, tenancy, metrics, named caches)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request

from radixserve.request_log import RequestLogWriter
from radixserve.engine import LLMEngine
from radixserve.request import CachePin, RequestOutput
from radixserve.sampling import SamplingParams
from radixserve.server.async_engine import AsyncEngine, RequestStream
from radixserve.server.auth import Authenticator
from radixserve.server.config import ServerConfig
from radixserve.server.errors import APIError
from radixserve.server.metrics import ServerMetrics


class ServerState:
    """One per app. Routes reach it as `request.app.state.radixserve` (see `get_state`)."""

    def __init__(self, engine: LLMEngine, config: ServerConfig) -> None:
        from radixserve.server.caches import NamedCacheStore  # caches needs ServerState's type only

        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics()
        self.async_engine = AsyncEngine(engine, on_finished=self.metrics.observe_finished)
        self.auth = Authenticator(config.api_keys, config.namespace_from_api_key)
        self.model_name = config.served_model_name or engine.model_id
        self.created = int(time.time())
        self.caches = NamedCacheStore(self)
        # opt-in: prompts can be sensitive, so nothing is logged unless a path is given
        self.request_log = RequestLogWriter(config.request_log) if config.request_log else None

    def log_request(self, api: str, body: dict, namespace: str) -> None:
        """Append an accepted request body to the request log (if one is configured)."""
        if self.request_log is not None:
            self.request_log.write(api, body, namespace=namespace)

    # ---- models -----------------------------------------------------------------------
    @property
    def model_aliases(self) -> set[str]:
        """Names a request may use for the one model served: the served name, the model's id
        and the --model value it was loaded from (e.g. "embedded")."""
        return {self.model_name, self.engine.model_id, self.engine.config.model.source}

    def check_model(self, name: str) -> None:
        if name not in self.model_aliases:
            raise APIError(
                404,
                f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # ---- limits -----------------------------------------------------------------------
    @property
    def max_total_tokens(self) -> int:
        """Prompt + output tokens one request can have: the context, and the KV pool."""
        return self.engine.max_total_tokens

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """When a request sets no limit, it may generate up to the end of its context."""
        return max(1, self.max_total_tokens - num_prompt_tokens)

    @property
    def prefix_caching(self) -> bool:
        return self.engine.prefix_caching

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    # ---- running requests ---------------------------------------------------------------
    async def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefix: str,
        namespace: str,
        cache_pins: list[CachePin] | None = None,
    ) -> RequestStream:
        """Hand a request to the engine; its id is `prefix` + a random suffix."""
        if not self.prefix_caching:
            cache_pins = None  # nothing to pin: the cache is off
        request_id = f"{prefix}{uuid.uuid4().hex[:24]}"
        return await self.async_engine.add_request(
            prompt_token_ids, params, request_id=request_id, namespace=namespace, cache_pins=cache_pins,
            arrival_time=time.monotonic(),
        )


def get_state(request: Request) -> ServerState:
    return request.app.state.radixserve


async def collect(stream: RequestStream, request: Request | None = None) -> RequestOutput:
    """Wait for a non-streamed request's final output, aborting it if the client hangs up
    meanwhile (so a gone client never holds KV blocks until its max_tokens)."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, stream)) if request is not None else None
    try:
        return await stream.result()
    finally:
        if watcher is not None:
            watcher.cancel()
        stream.close()


async def _abort_on_disconnect(request: Request, stream: RequestStream) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.close()
            return

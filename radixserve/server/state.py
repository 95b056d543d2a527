"""ServerState: what every route needs (engine, config, tenancy, metrics, named caches)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import Request

from radixserve.request_log import RequestLogWriter
from radixserve.errors import PromptTooLongError
from radixserve.request import CachePin, CachePolicy, RequestOutput
from radixserve.sampling import SamplingParams
from radixserve.server.async_engine import AsyncEngine
from radixserve.server.engine_client import EngineClient, RequestOptions, RequestStream
from radixserve.server.auth import Authenticator, Tenant
from radixserve.server.config import ServerConfig
from radixserve.server.errors import APIError
from radixserve.server.metrics import ServerMetrics
from radixserve.server.persistence import NoStateKeeper, StateKeeper
from radixserve.server.probe_guard import ProbeRateLimiter
from radixserve.server.prompting import ChatTurn, check_prompt_size


class ServerState:
    """One per app. Routes reach it as `request.app.state.radixserve` (see `get_state`)."""

    def __init__(self, engine_client: EngineClient, config: ServerConfig) -> None:
        from radixserve.server.caches import NamedCacheStore  # caches needs ServerState's type only

        # the one way to the engine, on a thread here or in its own process (--engine-process)
        self.async_engine = engine_client
        engine_client.on_finished = self._on_finished
        self.engine_info = engine_client.info
        # the LLMEngine itself when it steps on a thread of this process (None with the engine
        # process): the scale-out replica attaches its KV-event recorder to it
        self.engine = engine_client.engine if isinstance(engine_client, AsyncEngine) else None
        self.config = config
        self.tokenizer = engine_client.tokenizer
        self.metrics = ServerMetrics()
        self.auth = Authenticator(
            config.api_keys, config.namespace_from_api_key, admin_keys=config.admin_keys,
            metrics_keys=config.metrics_keys,
            key_cache_policies={k: CachePolicy(p) for k, p in config.key_cache_policies.items()},
            default_cache_policy=CachePolicy(config.default_cache_policy),
        )
        self.model_name = config.served_model_name or self.engine_info.model_id
        self.created = int(time.time())
        self.caches = NamedCacheStore(self)
        # what clients were promised (named caches, pins), saved to survive a restart (opt-in)
        self.keeper: StateKeeper | NoStateKeeper = StateKeeper(self, config.state_dir) if config.state_dir \
            else NoStateKeeper()
        # opt-in: prompts can be sensitive, so nothing is logged unless a path is given
        self.request_log = RequestLogWriter(config.request_log) if config.request_log else None
        self.probe_limiter = (ProbeRateLimiter(config.probe_rate_limit, config.probe_burst)
                              if config.probe_rate_limit is not None else None)

    def charge_probes(self, tenant: Tenant, cache_policy: CachePolicy, num_prompts: int = 1) -> None:
        """--probe-rate-limit: each prompt that reads the cache is a probe; 429 over the key's budget."""
        if self.probe_limiter is not None and cache_policy.reads and self.prefix_caching:
            self.probe_limiter.charge(tenant.owner, num_prompts)

    def _on_finished(self, out: RequestOutput) -> None:
        self.metrics.observe_finished(out)
        self.keeper.on_finished(out)
        if self.request_log is not None and out.cache_report is not None:
            self.request_log.write_cache_report(out.request_id, self.cache_report_json(out))

    def cache_report_json(self, out: RequestOutput) -> dict | None:
        """usage.cache_report of a finished output (None when it was not asked for)."""
        if out.cache_report is None:
            return None
        return out.cache_report.to_dict(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False))

    def log_request(self, api: str, body: dict, namespace: str) -> None:
        """Append an accepted request body to the request log (if one is configured)."""
        if self.request_log is not None:
            self.request_log.write(api, body, namespace=namespace)

    # ---- models -----------------------------------------------------------------------
    @property
    def model_aliases(self) -> set[str]:
        """Names a request may use for the one model served: the served name, the model's id
        and the --model value it was loaded from (e.g. "embedded")."""
        return {self.model_name, self.engine_info.model_id, self.engine_info.model_source}

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
        return self.engine_info.max_total_tokens

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """When a request sets no limit, it may generate up to the end of its context."""
        return max(1, self.max_total_tokens - num_prompt_tokens)

    def check_prompt_size(self, texts: list[str]) -> None:
        """400 (context_length_exceeded) at once when `texts` cannot fit the context, before
        anything renders or tokenizes them (see prompting.check_prompt_size)."""
        check_prompt_size(self.tokenizer, texts, self.engine_info.max_model_len)

    def check_prompt_tokens(self, num_tokens: int) -> None:
        """The exact check, once tokenized (the engine makes it again on admission)."""
        if num_tokens >= self.engine_info.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_tokens} tokens but the model's context length is {self.engine_info.max_model_len}"
            )

    def pin_bounds(self) -> tuple[int, int] | None:
        """(total, per namespace): the most KV blocks pins may hold (None: cache off). Fixed at
        start, so reading them from the event loop is safe."""
        return self.engine_info.pin_bounds

    def pin_bounds_text(self) -> str:
        bound = self.pin_bounds()
        if bound is None:
            return "pins are unbounded"
        pool = self.engine_info.num_kv_blocks
        return (f"at most {bound[1]} blocks per namespace ({bound[1] / pool:.0%} of the pool) "
                f"and {bound[0]} in total ({bound[0] / pool:.0%})")

    @property
    def prefix_caching(self) -> bool:
        return self.engine_info.prefix_caching

    @property
    def block_size(self) -> int:
        return self.engine_info.block_size

    # ---- running requests ---------------------------------------------------------------
    async def submit(self, prompt_token_ids: list[int], params: SamplingParams, **options: Any) -> RequestStream:
        """Hand a request (one choice) to the engine; options as submit_choices."""
        return (await self.submit_choices(prompt_token_ids, params, **options))[0]

    async def submit_choices(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefix: str,
        namespace: str,
        cache_pins: list[CachePin] | None = None,
        cache_policy: CachePolicy = CachePolicy.READ_WRITE,
        cache_report: bool = False,
        readable_namespaces: tuple[str, ...] = (),
    ) -> list[RequestStream]:
        """Hand a request of params.n choices to the engine (one prefill); a stream per choice.
        With `cache_report` each final output carries a CacheReport, which may name
        `readable_namespaces` (other namespaces the caller reads itself)."""
        if not self.prefix_caching or not cache_policy.writes:
            cache_pins = None  # nothing to pin: the cache is off, or this request may not write
        request_id = f"{prefix}{uuid.uuid4().hex[:24]}"
        arrival = time.monotonic()
        streams = await self.async_engine.add_choices(prompt_token_ids, params, RequestOptions(
            request_id=request_id, namespace=namespace, cache_pins=cache_pins, arrival_time=arrival,
            cache_policy=cache_policy, cache_report=cache_report, cache_report_namespaces=readable_namespaces,
        ))
        floor = self.config.shared_ttft_floor
        if floor and cache_policy.reads and self.prefix_caching and not namespace.startswith("key:"):
            # every request reading a cache other keys write answers no sooner than the floor,
            # misses too: padding hits alone would make the hits the slow ones
            for stream in streams:
                stream.not_before = arrival + floor
        return streams


def turn_texts(turns: list[ChatTurn]) -> list[str]:
    return [block for turn in turns for block in turn.blocks]


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


async def collect_all(streams: list[RequestStream], request: Request | None = None) -> list[RequestOutput]:
    """collect() for the choices of one request (n > 1): a client that hangs up aborts them all."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, *streams)) if request is not None else None
    try:
        return [await stream.result() for stream in streams]
    finally:
        if watcher is not None:
            watcher.cancel()
        for stream in streams:
            stream.close()


async def _abort_on_disconnect(request: Request, *streams: RequestStream) -> None:
    await wait_for_disconnect(request)
    for stream in streams:
        stream.close()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up. Call it once the body has been read: the next ASGI
    message can then only be the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

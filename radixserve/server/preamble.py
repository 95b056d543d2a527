"""What every generation route does before it generates: authenticate the caller, read and
validate the body, check the model name, and resolve a named cache into the prefix-cache
namespace the request runs in. One place, so the OpenAI and Anthropic routes cannot drift."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel

from radixserve.request import CachePolicy
from radixserve.server.auth import Tenant
from radixserve.server.caches import NamedCache
from radixserve.server.errors import APIError
from radixserve.server.parsing import parse_model, read_json
from radixserve.server.state import ServerState, get_state

M = TypeVar("M", bound=BaseModel)


@dataclass(slots=True)
class ParsedRequest(Generic[M]):
    state: ServerState
    tenant: Tenant
    data: dict[str, Any]  # the JSON body as sent: the request log records it, not the parsed model
    body: M
    cache_policy: CachePolicy = CachePolicy.READ_WRITE  # the body's cache_policy, capped by the key's
    cache_report: bool = False  # the body asked for usage.cache_report, or the server gives it always

    def readable_namespaces(self, cache_salt: str | None) -> tuple[str, ...]:
        """Namespaces besides the request's own that its cache report may name: with a
        cache_salt, the caller's unsalted namespace (which it could probe without the salt)."""
        return (self.tenant.namespace(None),) if cache_salt else ()


async def parse_request(request: Request, model: type[M]) -> ParsedRequest[M]:
    """Authenticate, read the body as `model` and check the model it names (401, 413, 400, 404)."""
    state = get_state(request)
    tenant = state.auth.authenticate(request)
    data = await read_json(request, state.config.max_request_bytes, state.config.body_read_timeout)
    body = parse_model(model, data)
    state.check_model(body.model)
    policy = tenant.cache_policy_for(getattr(body, "cache_policy", None))
    report = state.config.cache_report or bool(getattr(body, "cache_report", False))
    state.charge_probes(tenant, policy)
    return ParsedRequest(state, tenant, data, body, policy, report)


async def resolve_named_cache(
    state: ServerState, tenant: Tenant, cached_content: str | None, cache_salt: str | None,
    cache_policy: CachePolicy = CachePolicy.READ_WRITE,
) -> tuple[NamedCache | None, str]:
    """The named cache a request reads (None when it names none) and the prefix-cache namespace
    it runs in: the cache's own, so its blocks are found; a cache_salt may confirm it, not change it."""
    namespace = tenant.namespace(cache_salt)
    if not cached_content:
        return None, namespace
    if not cache_policy.reads:
        raise APIError(400, "cached_content reads the prefix cache, and this request's cache_policy is 'none'",
                       param="cache_policy")
    cache = await state.caches.get(tenant.owner, cached_content)
    if cache_salt and cache.namespace != namespace:
        # param is OpenAI's field; Anthropic's error format drops it
        raise APIError(400, "cache_salt differs from the one the named cache was created with", param="cache_salt")
    return cache, cache.namespace

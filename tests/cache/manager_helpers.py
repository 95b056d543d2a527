"""Driving a KVCacheManager through one request's whole life, without a model."""

from __future__ import annotations

from radixserve.cache.manager import KVCacheManager
from radixserve.request import Request
from radixserve.sampling import SamplingParams


def run_request(cache: KVCacheManager, rid: str, tokens: list[int], namespace: str = "",
                scope: str | None = None, cache_report: bool = False) -> int:
    """Admit, compute and free a one-token request over `tokens`; returns its cached tokens."""
    request = Request(request_id=rid, prompt=None, prompt_token_ids=tokens, sampling=SamplingParams(max_tokens=1),
                      namespace=namespace, publish_scope=scope, want_cache_report=cache_report)
    cached = cache.admit(request)
    n = request.num_tokens - cached
    assert cache.allocate_slots(request, n)
    cache.advance(request, n)
    cache.free(request)
    return cached

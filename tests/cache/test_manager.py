"""KVCacheManager: a request's KV state lives in a KVHandle that only the manager writes."""

import pytest

from radixserve.cache.manager import KVCacheManager
from radixserve.cache.null_cache import NullPrefixCache
from radixserve.request import Request
from radixserve.sampling import SamplingParams


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt=None, prompt_token_ids=tokens, sampling=SamplingParams(max_tokens=1))


def _run(cache: KVCacheManager, request: Request, chunk: int) -> int:
    cached = cache.admit(request)
    while (computed := cache.num_computed_tokens(request)) < request.num_tokens:
        assert cache.allocate_slots(request, min(chunk, request.num_tokens - computed))
        cache.advance(request, min(chunk, request.num_tokens - computed))
    return cached


def test_handle_lifecycle_and_ranges():
    cache = KVCacheManager(num_blocks=16, block_size=4, model_key="m")
    first = _request("a", list(range(10)))
    assert _run(cache, first, chunk=3) == 0
    kv = cache.kv(first)
    assert kv.num_computed_tokens == 10 and kv.num_tree_tokens == 8  # whole blocks only
    assert len(kv.block_ids) == 3
    cache.free(first)
    with pytest.raises(KeyError):
        cache.kv(first)
    assert cache.num_computed_tokens(first) == 0
    cache.free(first)  # idempotent
    second = _request("b", list(range(10)) + [99])
    assert _run(cache, second, chunk=100) == 8  # reuses the two cached blocks
    cache.free(second)
    assert cache.num_free_blocks() + cache.num_cached_blocks() == cache.num_blocks


def test_caching_off_is_a_null_prefix_cache():
    cache = KVCacheManager(num_blocks=8, block_size=4, model_key="m", enable_prefix_caching=False)
    assert isinstance(cache.prefix_cache, NullPrefixCache)
    for rid in ("a", "b"):
        request = _request(rid, list(range(10)))
        assert _run(cache, request, chunk=4) == 0
        assert cache.kv(request).node is None
        cache.free(request)
    assert cache.stats.queries == cache.stats.hit_tokens == cache.stats.inserted_blocks == 0
    assert cache.num_free_blocks() == cache.num_blocks and cache.num_cached_blocks() == 0
    assert cache.pin_prefix("", list(range(8)), ttl=60) == 0 and cache.reset_prefix_cache() == 0

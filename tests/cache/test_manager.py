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


def test_reuse_partial_blocks_copies_the_head_of_a_tree_block_and_never_writes_it():
    cache = KVCacheManager(num_blocks=16, block_size=4, model_key="m", reuse_partial_blocks=True)
    _run(cache, _request("seed", list(range(12))), chunk=100)  # blocks [0..3] [4..7] [8..11] cached
    tree_block = cache.prefix_cache.match_prefix(cache.cache_key(""), list(range(12))).block_ids[1]
    reader = _request("r", [0, 1, 2, 3, 4, 5, 99, 98])  # diverges 2 tokens into the second block
    assert cache.admit(reader) == 6  # the first block whole, then the second block's head
    kv = cache.kv(reader)
    assert kv.num_tree_tokens == 4 and kv.block_ids[1] == tree_block  # shared until written
    assert cache.allocate_slots(reader, 2)
    copies = cache.take_block_copies()
    assert copies == [(tree_block, kv.block_ids[1])] and kv.block_ids[1] != tree_block  # copied before the forward
    cache.advance(reader, 2)
    cache.free(reader)
    assert cache.stats.partial_hit_tokens == 2 and cache.stats.hit_tokens == 6
    assert cache.num_free_blocks() + cache.num_cached_blocks() == cache.num_blocks
    # off (the default): whole blocks only
    plain = KVCacheManager(num_blocks=16, block_size=4, model_key="m")
    _run(plain, _request("seed", list(range(12))), chunk=100)
    assert plain.admit(_request("r", [0, 1, 2, 3, 4, 5, 99, 98])) == 4


def test_a_reused_head_survives_the_eviction_of_its_tree_block():
    cache = KVCacheManager(num_blocks=6, block_size=4, model_key="m", reuse_partial_blocks=True)
    seed = _request("seed", list(range(8)))
    _run(cache, seed, chunk=100)
    cache.free(seed)
    reader = _request("r", [0, 1, 2, 3, 4, 5, 99])
    assert cache.admit(reader) == 6
    shared = cache.kv(reader).block_ids[1]
    cache.prefix_cache.evict(10)  # the unlocked leaf (tokens 4..7) leaves the tree; the reader's ref keeps its block
    assert cache.num_cached_blocks() == 1 and not cache.pool.is_free(shared)
    assert cache.allocate_slots(reader, 1)  # now only the reader holds it: no copy needed, but one is harmless
    cache.take_block_copies()
    cache.advance(reader, 1)
    cache.free(reader)
    assert cache.num_free_blocks() + cache.num_cached_blocks() == cache.num_blocks

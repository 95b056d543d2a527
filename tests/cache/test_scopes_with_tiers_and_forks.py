"""Shared scopes (#16) together with the storage tier (#13) and n > 1 forks.

A request that read a shared scope inserts its blocks into its continuation namespace from
the scope's end; their tier keys must still be those of the whole prompt (block i of the
prompt has key i of the chain from token 0), and a fork must hold the scope as the parent does.
"""

from __future__ import annotations

from radixserve.cache.block_keys import CacheIdentity, prefix_keys
from radixserve.cache.kv_store import MemoryKVStore
from radixserve.cache.manager import KVCacheManager
from radixserve.request import Request
from radixserve.sampling import SamplingParams

BS = 4
SHARED = list(range(1, 3 * BS + 1))  # 3 blocks
IDENTITY = CacheIdentity("model@abc/float32", BS)


def _request(rid: str, tokens: list[int], namespace: str = "", scope: str | None = None) -> Request:
    return Request(request_id=rid, prompt=None, prompt_token_ids=tokens, sampling=SamplingParams(max_tokens=1),
                   namespace=namespace, publish_scope=scope)


def _prefill(cache: KVCacheManager, request: Request) -> int:
    cached = cache.admit(request)
    n = request.num_tokens - cached
    assert cache.allocate_slots(request, n)
    cache.advance(request, n)
    return cached


def _published(**kwargs) -> KVCacheManager:
    cache = KVCacheManager(num_blocks=64, block_size=BS, model_key="m", **kwargs)
    cache.shared_scopes.publish("sys", SHARED)
    publisher = _request("publish", SHARED, scope="sys")
    _prefill(cache, publisher)
    cache.free(publisher)
    return cache


def test_tier_keys_of_a_scoped_request_are_indexed_over_the_whole_prompt():
    store = MemoryKVStore(IDENTITY.describe(), 1 << 20)
    cache = _published(identity=IDENTITY, store=store, block_bytes=16, write_through_all=True)
    cache.take_transfers()
    prompt = SHARED + list(range(100, 100 + 2 * BS + 1))  # 3 shared blocks, 2 of its own, 1 token
    request = _request("a", prompt, namespace="key:A")
    assert _prefill(cache, request) == len(SHARED)
    handle = cache.kv(request)
    assert handle.scope_tokens == len(SHARED)
    keys = prefix_keys(IDENTITY, "key:A", prompt)
    own = [(handle.block_ids[i], keys[i]) for i in (3, 4)]
    assert [(b, cache._block_keys[b]) for b, _ in own] == own
    assert cache.take_transfers().write_through == own  # the scope's blocks are not the tenant's to write
    cache.free(request)


def test_a_fork_holds_the_scope_until_each_choice_is_freed():
    cache = _published()
    prompt = SHARED + [100, 101]
    parent, child = _request("p", prompt, namespace="key:A"), _request("p-1", prompt, namespace="key:A")
    _prefill(cache, parent)
    scope_node = cache.kv(parent).scope_node
    assert scope_node is not None and scope_node.lock_ref == 1
    cache.fork(parent, child)
    handle = cache.kv(child)
    assert (handle.scope_node, handle.scope_tokens) == (scope_node, len(SHARED))
    assert scope_node.lock_ref == 2
    cache.free(parent)
    assert scope_node.lock_ref == 1
    cache.free(child)
    assert scope_node.lock_ref == 0
    cache.prefix_cache.check_invariants()

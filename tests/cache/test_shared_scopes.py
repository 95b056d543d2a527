"""Shared scopes: every tenant reads an operator's published prefix; what follows stays private.

The property test checks, against an independent model (each tenant's own earlier prompts),
that a tenant's hit is exactly the shared part plus what it cached itself: never a token of
another tenant's suffix, even when the two send identical suffixes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.cache.manager import KVCacheManager
from tests.cache.manager_helpers import run_request

BS = 4
SHARED = list(range(1, 3 * BS + 1))  # 3 blocks


def _published(num_blocks: int = 512, reuse_partial_blocks: bool = False) -> KVCacheManager:
    cache = KVCacheManager(num_blocks=num_blocks, block_size=BS, model_key="m", reuse_partial_blocks=reuse_partial_blocks)
    cache.shared_scopes.publish("sys", SHARED)
    run_request(cache, "publish", SHARED, scope="sys")
    return cache


def _common_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while n + BS <= min(len(a), len(b)) and a[n : n + BS] == b[n : n + BS]:
        n += BS
    return n


def _common_head(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# suffixes made of a few whole blocks, so the two tenants often send the very same ones
_BLOCKS = [[100 + 10 * b + i for i in range(BS)] for b in range(3)]
suffixes = st.builds(
    lambda blocks, tail: [t for b in blocks for t in _BLOCKS[b]] + tail,
    st.lists(st.integers(0, 2), max_size=5), st.lists(st.integers(100, 130), min_size=1, max_size=BS - 1),
)
traffic = st.lists(st.tuples(st.sampled_from(["key:A", "key:B"]), suffixes), min_size=1, max_size=30)


@pytest.mark.parametrize("reuse_partial_blocks", [False, True])
@settings(max_examples=80, deadline=None)
@given(requests=traffic)
def test_each_tenant_reads_the_shared_part_and_only_its_own_suffixes(reuse_partial_blocks, requests):
    cache = _published(reuse_partial_blocks=reuse_partial_blocks)
    seen: dict[str, list[list[int]]] = {"key:A": [], "key:B": []}
    for i, (tenant, suffix) in enumerate(requests):
        prompt = SHARED + suffix
        cacheable = (len(prompt) - 1) // BS * BS
        own = max((_common_blocks(suffix, earlier) for earlier in seen[tenant]), default=0)
        whole = min(len(SHARED) + own, cacheable) - len(SHARED)
        # then the head of a cached block after the same whole blocks, up to the last prompt token
        head = max((_common_head(suffix[whole : whole + BS], earlier[whole : whole + BS]) for earlier in seen[tenant]
                    if earlier[:whole] == suffix[:whole] and len(earlier) >= whole + BS), default=0)
        expected = len(SHARED) + whole + (min(head, len(prompt) - 1 - len(SHARED) - whole) if reuse_partial_blocks else 0)
        assert run_request(cache, f"r{i}", prompt, tenant) == expected
        seen[tenant].append(suffix + [])  # its whole prompt (prompt and the one output) is in its namespace
        cache.prefix_cache.check_invariants()
    assert cache.num_free_blocks() + cache.num_cached_blocks() == cache.num_blocks


def test_a_tenant_never_writes_into_the_scope():
    cache = _published()
    scope_key = cache.shared_scopes.scope_key(cache.shared_scopes.get("sys"))
    before = cache.prefix_cache.blocks_by_namespace[scope_key]
    run_request(cache, "a", SHARED + list(range(200, 240)), "key:A")
    run_request(cache, "b", SHARED[: 2 * BS] + list(range(300, 340)), "key:B")  # starts with part of it only
    assert cache.prefix_cache.blocks_by_namespace[scope_key] == before == len(SHARED) // BS
    # a salt that spells the scope's key lands in the tenant's own namespace, not the scope
    assert run_request(cache, "c", SHARED + [7] * 9, "shared\x00m\x00sys") == len(SHARED)
    assert cache.prefix_cache.blocks_by_namespace[scope_key] == before


def test_republishing_other_tokens_under_the_same_name_never_reads_old_suffixes():
    cache = _published()
    suffix = list(range(200, 220))
    run_request(cache, "a1", SHARED + suffix, "key:A")
    assert run_request(cache, "a2", SHARED + suffix, "key:A") == len(SHARED) + 16
    new_shared = SHARED[:BS] + [999] * (2 * BS)
    cache.shared_scopes.publish("sys", new_shared)
    run_request(cache, "publish2", new_shared, scope="sys")
    assert run_request(cache, "a3", new_shared + suffix, "key:A") == len(new_shared)  # the old suffix KV is not read

"""--tenant-quota: a tenant's flood evicts its own blocks, never the other tenants' prefixes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.cache.manager import KVCacheManager
from tests.cache.manager_helpers import run_request

BS = 4


def _flood(quota: int | None, prompts: list[list[int]]) -> tuple[KVCacheManager, int]:
    cache = KVCacheManager(num_blocks=32, block_size=BS, model_key="m", tenant_quota_blocks=quota)
    victim = list(range(1, 4 * BS + 2))  # 4 blocks
    run_request(cache, "v0", victim, "key:V")
    for i, prompt in enumerate(prompts):
        run_request(cache, f"f{i}", prompt, "key:F")
        if quota is not None:
            assert cache.tenants.blocks_held().get("key:F", 0) <= quota  # the quota holds after every request
        cache.prefix_cache.check_invariants()
    return cache, run_request(cache, "v1", victim, "key:V")


flood_prompts = st.lists(
    st.lists(st.integers(100, 100_000), min_size=BS + 1, max_size=7 * BS), min_size=5, max_size=25)


@settings(max_examples=60, deadline=None)
@given(flood_prompts)
def test_a_flood_stays_within_its_quota_and_the_victims_prefix_survives(prompts):
    cache, victim_hit = _flood(quota=12, prompts=prompts)
    assert victim_hit == 4 * BS
    held = cache.tenants.blocks_held()
    assert held["key:V"] == 4 and held.get("key:F", 0) <= 12
    assert cache.num_free_blocks() + cache.num_cached_blocks() == cache.num_blocks


def test_without_a_quota_the_same_flood_flushes_the_victim():
    prompts = [list(range(1000 * i, 1000 * i + 7 * BS)) for i in range(1, 10)]
    _, victim_hit = _flood(quota=None, prompts=prompts)
    assert victim_hit == 0
    cache, victim_hit = _flood(quota=12, prompts=prompts)
    assert victim_hit == 4 * BS
    assert cache.tenants.stats["key:F"].evicted_blocks > 0 and cache.tenants.stats["key:V"].evicted_blocks == 0


def test_salts_count_toward_their_keys_quota():
    cache = KVCacheManager(num_blocks=64, block_size=BS, model_key="m", tenant_quota_blocks=6)
    for i in range(8):
        run_request(cache, f"s{i}", list(range(100 * i + 1, 100 * i + 3 * BS + 2)), f"key:F|salt:{i}")
    assert cache.tenants.blocks_held()["key:F"] <= 6

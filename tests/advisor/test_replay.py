"""The replay (engine's cache manager over a log) and the capacity curve, on synthetic token ids."""

from __future__ import annotations

import random

import pytest

from radixserve.advisor.curve import capacity_curve, geometric_grid
from radixserve.advisor.logs import PromptRequest
from radixserve.advisor.replay import ReplayConfig, replay


def reqs(token_lists, timestamps=None, namespaces=None) -> list[PromptRequest]:
    return [
        PromptRequest(i, i + 1, "prompt", namespaces[i] if namespaces else "",
                      timestamps[i] if timestamps else None, list(ids))
        for i, ids in enumerate(token_lists)
    ]


def test_cached_count_rule_block_aligned_and_capped_at_n_minus_one():
    base = list(range(100, 200))  # 100 tokens
    cases = [
        base,  # seed
        base[:37] + [7] * 20,  # diverges inside block 3: 32 cached
        base[:48] + [7] * 30,  # diverges at a block boundary: 48
        list(base),  # identical: n-1 cap -> 96
        base[:96],  # block multiple: the last block is recomputed -> 80
        [7] + base[1:50],  # first token differs: 0
    ]
    result = replay(reqs(cases), ReplayConfig(block_size=16))
    assert result.cached_tokens == [0, 32, 48, 96, 80, 0]
    assert result.hit_tokens == 256 and result.query_tokens == sum(map(len, cases))
    assert result.hits == 4 and result.evicted_blocks == 0


def test_namespaces_never_share():
    ids = list(range(64))
    result = replay(reqs([ids, ids, ids], namespaces=["a", "b", "a"]), ReplayConfig(block_size=16))
    assert result.cached_tokens == [0, 0, 48]


def test_lru_eviction_under_a_small_capacity():
    a, b, c = ([k] * 64 for k in (1, 2, 3))  # 4 blocks each (+1 for the n-1 rule when repeated)
    # 9 blocks: two prompts stay cached besides the one being prefilled... minus the partial block.
    log = [a, b, a, c, a, b]
    result = replay(reqs(log), ReplayConfig(block_size=16, capacity_blocks=9))
    # a, b cached; a hits 48; c evicts b (LRU); a hits; b was evicted: miss.
    assert result.cached_tokens == [0, 0, 48, 0, 48, 0]
    assert result.evicted_blocks > 0
    unbounded = replay(reqs(log), ReplayConfig(block_size=16))
    assert unbounded.cached_tokens == [0, 0, 48, 0, 48, 48]


def test_ttl_expires_prefixes_unused_for_longer():
    ids = list(range(80))
    log = reqs([ids, ids, ids, ids], timestamps=[0.0, 100.0, 500.0, 560.0])
    result = replay(log, ReplayConfig(block_size=16, ttl=300.0))
    # 0 -> 100: still cached; 100 -> 500: unused for 400 s > 300, expired; 500 -> 560: cached again.
    assert result.cached_tokens == [0, 64, 0, 64]
    assert result.expired_blocks == 5
    without = replay(log, ReplayConfig(block_size=16))
    assert without.cached_tokens == [0, 64, 64, 64]


def test_ttl_keeps_the_shared_parent_of_a_fresh_branch():
    shared = list(range(64))
    log = reqs([shared + [1] * 32, shared + [2] * 32, shared + [3] * 32], timestamps=[0.0, 250.0, 400.0])
    result = replay(log, ReplayConfig(block_size=16, ttl=300.0))
    # At t=400 the first branch expired (unused since t=0) but the shared part was used at 250.
    assert result.cached_tokens == [0, 64, 64]
    assert result.expired_blocks == 2


def test_too_long_requests_are_rejected_not_replayed():
    result = replay(reqs([[1] * 100, [2] * 10]), ReplayConfig(block_size=16, capacity_blocks=4))
    assert result.rejected == [0] and result.cached_tokens == [-1, 0]
    assert result.num_requests == 1 and result.query_tokens == 10
    result = replay(reqs([[1] * 100]), ReplayConfig(block_size=16, max_model_len=100))
    assert result.rejected == [0]


def test_chunked_prefill_replays_like_one_shot():
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000) for _ in range(300)] for _ in range(3)]
    log = reqs([rng.choice(prefixes) + [rng.randrange(1000) for _ in range(40)] for _ in range(30)])
    small = replay(log, ReplayConfig(block_size=16, capacity_blocks=50, max_num_batched_tokens=64))
    large = replay(log, ReplayConfig(block_size=16, capacity_blocks=50, max_num_batched_tokens=4096))
    assert small.cached_tokens == large.cached_tokens


def test_config_validation():
    with pytest.raises(ValueError):
        ReplayConfig(block_size=0)
    with pytest.raises(ValueError):
        ReplayConfig(capacity_blocks=0)
    with pytest.raises(ValueError):
        ReplayConfig(ttl=0)


def test_capacity_curve_finds_the_knee():
    rng = random.Random(1)
    prefixes = [[rng.randrange(1000) for _ in range(160)] for _ in range(6)]  # 10 blocks each
    log = reqs([rng.choice(prefixes) + [rng.randrange(1000) for _ in range(20)] for _ in range(120)])
    base = ReplayConfig(block_size=16)
    curve = capacity_curve(log, base, num_points=8)
    rates = [p.hit_rate for p in curve.points]
    assert rates == sorted(rates)  # more memory never hurts LRU here
    assert curve.points[-1].hit_rate == pytest.approx(replay(log, base).hit_rate)
    assert curve.max_hit_rate == curve.points[-1].hit_rate
    knee = curve.knee_blocks
    assert knee is not None
    assert replay(log, ReplayConfig(block_size=16, capacity_blocks=knee)).hit_rate >= 0.95 * curve.max_hit_rate
    if knee > curve.points[0].capacity_blocks:
        below = replay(log, ReplayConfig(block_size=16, capacity_blocks=knee - 1)).hit_rate
        assert below < 0.95 * curve.max_hit_rate  # the smallest such capacity (bisection is exact here)
    # Six prefixes of ~11 blocks plus a request: saturation needs most of them resident.
    assert 40 <= knee <= 90


def test_geometric_grid():
    assert geometric_grid(10, 10, 5) == [10]
    grid = geometric_grid(10, 1000, 5)
    assert grid[0] == 10 and grid[-1] == 1000 and len(grid) == 5 and grid == sorted(grid)
    assert geometric_grid(3, 5, 10) == [3, 4, 5]

"""HostKVCache's bookkeeping and bytes, on CPU (unpinned, synchronous: the same code path as on
a GPU minus the stream). The GPU path itself is exercised by bench/bench_tiers_gpu.py, which
checks that the blocks loaded back equal the blocks evicted."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch

from radixserve.host_cache import HostKVCache, slot_runs
from radixserve.model.attention import KVCache


def _pool(num_blocks: int = 8, dtype=torch.bfloat16) -> KVCache:
    arch = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=4)
    kv = KVCache.allocate(arch, num_blocks, 4, dtype, "cpu")
    kv.storage.copy_(torch.randn(kv.storage.shape).to(dtype))
    return kv


def _key(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def test_slot_runs_group_consecutive_slots():
    assert slot_runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert slot_runs([]) == []


def test_blocks_come_back_bitwise_into_other_blocks():
    kv = _pool()
    host = HostKVCache(kv, 4 * kv.storage[:, :, 0].numel() * 2)
    assert host.num_slots == 4
    saved = kv.storage[:, :, [1, 2, 5]].clone()
    assert host.save([1, 2, 5], [_key(1), _key(2), _key(5)]) == 3
    assert host.contains([_key(1), _key(2), _key(3), _key(5)]) == [True, True, False, True]
    assert host.save([1], [_key(1)]) == 0  # held already: not copied again
    kv.storage.zero_()
    host.load([6, 0, 3], [_key(1), _key(2), _key(5)])
    assert torch.equal(kv.storage[:, :, [6, 0, 3]], saved)
    assert host.hits == 3 and host.bytes_loaded == 3 * host.block_bytes


def test_lru_eviction_spills_the_evicted_blocks_and_spares_protected_keys():
    kv = _pool()
    host = HostKVCache(kv, 2 * host_block_bytes(kv))
    host.save([0, 1], [_key(0), _key(1)])
    expected_0 = kv.storage[:, :, 0].clone()
    host.load([7], [_key(1)])  # key 1 is now the most recent; key 0 the LRU
    spilled = []
    host.save([2], [_key(2)], spill=lambda keys, blocks: spilled.append((keys, blocks.clone())))
    assert host.contains([_key(0), _key(1), _key(2)]) == [False, True, True]
    assert spilled[0][0] == [_key(0)] and torch.equal(spilled[0][1][0], expected_0)
    # a key this step loads is never the victim: with both held keys protected nothing fits
    assert host.save([3], [_key(3)], protected={_key(1), _key(2)}) == 0
    assert host.contains([_key(1), _key(2), _key(3)]) == [True, True, False]
    assert host.evictions == 1 and host.used_bytes <= host.capacity_bytes


def test_a_host_tier_smaller_than_a_block_is_refused():
    kv = _pool()
    with pytest.raises(ValueError, match="host-cache-gb"):
        HostKVCache(kv, host_block_bytes(kv) - 1)


def host_block_bytes(kv: KVCache) -> int:
    return kv.storage[:, :, 0].numel() * kv.storage.element_size()


def test_cost_model_explores_a_tier_it_judged_slower():
    from radixserve.cache.tiers import LoadCostModel

    model = LoadCostModel(read_bytes_per_s={"host": 1.0, "storage": 1.0}, prefill_tokens_per_s=1e9, explore_every=4)
    decisions = [model.should_load("storage", 16, 10**6) for _ in range(8)]
    assert decisions == [False, False, False, True] * 2
    model.observe_read("storage", 10**9, 1.0)  # the exploring load measured 1 GB/s
    assert model.read_bytes_per_s["storage"] > 1e8

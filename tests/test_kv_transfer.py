"""Pool blocks <-> records: bitwise round trips, through a disk store and a restart too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from radixserve.cache.block_keys import CacheIdentity, prefix_keys
from radixserve.cache.disk_store import DiskKVStore
from radixserve.kv_transfer import KVLayoutMismatchError, block_layout, blocks_to_records, records_to_blocks
from radixserve.model.arch import ModelArch
from radixserve.model.attention import KVCache

ARCH = ModelArch(
    architecture="LlamaForCausalLM",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
)
BLOCK_SIZE = 4


def random_pool(dtype: torch.dtype, num_blocks: int = 6, seed: int = 0) -> KVCache:
    """A pool of random bit patterns (NaNs, infinities, -0.0 included: the copy must be raw)."""
    kv = KVCache.allocate(ARCH, num_blocks, BLOCK_SIZE, dtype, "cpu")
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (kv.storage.numel() * kv.storage.element_size(),), dtype=torch.uint8, generator=gen)
    kv.storage.view(-1).view(torch.uint8).copy_(bits)
    return kv


def block_bytes(kv: KVCache, block_id: int) -> bytes:
    return kv.storage[:, :, block_id].contiguous().view(torch.uint8).numpy().tobytes()


def identity_for(dtype: torch.dtype) -> CacheIdentity:
    return CacheIdentity(f"toy@abc/{str(dtype).removeprefix('torch.')}", BLOCK_SIZE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_round_trip_bitwise_into_other_blocks(dtype: torch.dtype) -> None:
    src, dst = random_pool(dtype, seed=1), random_pool(dtype, seed=2)
    identity = identity_for(dtype)
    keys = prefix_keys(identity, "", list(range(2 * BLOCK_SIZE)))
    records = blocks_to_records(src, [4, 1], keys, identity.describe())

    layout = block_layout(src)
    assert layout.shape == (3, 2, BLOCK_SIZE, 2, 4) and layout.dtype == str(dtype).removeprefix("torch.")
    assert [r.key for r in records] == keys and records[0].payload == block_bytes(src, 4)
    # The payload is layer-major, K before V: layer 1's V of block 1 sits where the layout says.
    itemsize = src.storage.element_size()
    per_kv = BLOCK_SIZE * 2 * 4 * itemsize
    start = (1 * 2 + 1) * per_kv
    layer1_v = src.value_caches[1][1].contiguous().view(torch.uint8).numpy().tobytes()
    assert records[1].payload[start : start + per_kv] == layer1_v

    untouched = {b: block_bytes(dst, b) for b in (0, 2, 3, 5)}
    records_to_blocks(dst, [0, 3], records)
    assert block_bytes(dst, 0) == block_bytes(src, 4) and block_bytes(dst, 3) == block_bytes(src, 1)
    assert {b: block_bytes(dst, b) for b in (2, 5)} == {b: untouched[b] for b in (2, 5)}


def test_layout_mismatch_writes_nothing() -> None:
    src, dst = random_pool(torch.float16), random_pool(torch.float32, seed=3)
    identity = identity_for(torch.float16)
    records = blocks_to_records(src, [0], prefix_keys(identity, "", range(BLOCK_SIZE)), identity.describe())
    before = dst.storage.clone()
    with pytest.raises(KVLayoutMismatchError, match="layout"):
        records_to_blocks(dst, [1], records)
    assert torch.equal(dst.storage.view(torch.uint8), before.view(torch.uint8))


def test_argument_checks() -> None:
    kv = random_pool(torch.float32)
    with pytest.raises(ValueError, match="keys"):
        blocks_to_records(kv, [0, 1], [], "x")
    with pytest.raises(ValueError, match="records"):
        records_to_blocks(kv, [0], [])
    assert blocks_to_records(kv, [], [], "x") == [] and records_to_blocks(kv, [], []) is None


def test_pool_to_disk_to_pool_across_a_restart(tmp_path: Path) -> None:
    """What one process saved, a restarted one loads bitwise into different blocks."""
    dtype = torch.bfloat16
    identity = identity_for(dtype)
    tokens = list(range(3 * BLOCK_SIZE + 1))  # three full blocks and a partial one (never stored)
    keys = prefix_keys(identity, "tenant", tokens)
    src = random_pool(dtype, seed=4)
    with DiskKVStore(tmp_path, 10**6, identity.describe()) as store:
        assert store.put(blocks_to_records(src, [5, 0, 2], keys, identity.describe())) == 3

    dst = random_pool(dtype, seed=5)
    with DiskKVStore(tmp_path, 10**6, identity.describe()) as store:
        found = store.get(prefix_keys(identity, "tenant", tokens))
        assert all(r is not None for r in found)
        records_to_blocks(dst, [1, 2, 3], found)  # type: ignore[arg-type]
        assert store.get(prefix_keys(identity, "other-tenant", tokens)) == [None, None, None]
    assert [block_bytes(dst, b) for b in (1, 2, 3)] == [block_bytes(src, b) for b in (5, 0, 2)]


def test_read_only_payloads_load_too() -> None:
    """A store holding immutable bytes (the memory backend) hands out read-only payloads."""
    src, dst = random_pool(torch.float16, seed=6), random_pool(torch.float16, seed=7)
    identity = identity_for(torch.float16)
    records = blocks_to_records(src, [2], prefix_keys(identity, "", range(BLOCK_SIZE)), identity.describe())
    frozen = [dataclasses.replace(r, payload=bytes(r.payload)) for r in records]
    records_to_blocks(dst, [5], frozen)
    assert block_bytes(dst, 5) == block_bytes(src, 2)

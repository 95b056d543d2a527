"""A waiting request is keyed and its store run asked once: loading() finds them (StorageProbe),
admission reuses them. Real manager, real MemoryKVStore; the store only counts its `contains`
round trips and the key module its sha256 blocks (both still do the real work)."""

from __future__ import annotations

import pytest

from radixserve.cache import block_keys
from radixserve.cache.block_keys import CacheIdentity, prefix_keys
from radixserve.cache.kv_store import KVLayout, KVRecord, MemoryKVStore
from radixserve.cache.manager import KVCacheManager
from radixserve.cache.tiers import StorageProbe
from radixserve.request import Request
from radixserve.sampling import SamplingParams

BS = 4
IDENTITY = CacheIdentity("model@abc/float32", BS)
LAYOUT = KVLayout("float32", (1, 2, BS, 1, 2))  # 64 bytes a block
PROMPT = list(range(100, 100 + 6 * BS + 1))  # 6 full blocks and 1 token


class CountingStore(MemoryKVStore):
    def __init__(self) -> None:
        super().__init__(IDENTITY.describe(), 1 << 20)
        self.contains_calls = 0

    def _contains(self, keys):
        self.contains_calls += 1
        return super()._contains(keys)


@pytest.fixture
def hashed_blocks(monkeypatch) -> list[int]:
    """How many block keys are hashed (sha256) from here on."""
    count = [0]
    real = block_keys.block_key

    def counting(parent, token_ids):
        count[0] += 1
        return real(parent, token_ids)

    monkeypatch.setattr(block_keys, "block_key", counting)
    return count


def _cache(store: CountingStore) -> KVCacheManager:
    return KVCacheManager(num_blocks=64, block_size=BS, model_key="m", identity=IDENTITY, store=store,
                          block_bytes=LAYOUT.nbytes)


def _store_blocks(store: CountingStore, num_blocks: int) -> None:
    keys = prefix_keys(IDENTITY, "", PROMPT)[:num_blocks]
    store.put([KVRecord(k, IDENTITY.describe(), LAYOUT, bytes([i]) * LAYOUT.nbytes) for i, k in enumerate(keys)])


def _request(rid: str) -> Request:
    return Request(request_id=rid, prompt=None, prompt_token_ids=list(PROMPT), sampling=SamplingParams(max_tokens=1))


def _wait_until_loaded(cache: KVCacheManager, request: Request) -> None:
    while cache.loading(request):
        cache.wait_for_loading(1.0)


def test_a_stored_prefix_is_keyed_and_asked_for_once(hashed_blocks):
    store = CountingStore()
    _store_blocks(store, 4)
    cache = _cache(store)
    request = _request("a")
    hashed_blocks[0] = 0
    assert cache.loading(request)  # the read of the 4 stored blocks runs in the background
    _wait_until_loaded(cache, request)
    assert cache.admit(request) == 4 * BS
    assert [r.payload[0] for _, r in cache.take_transfers().store_loads] == [0, 1, 2, 3]
    assert cache.tier_stats.prefetched_blocks == 4 and cache.tier_stats.short_loads == 0
    assert store.contains_calls == 1
    assert hashed_blocks[0] == 6  # each full block of the prompt once
    assert cache.kv(request).keys.keys == prefix_keys(IDENTITY, "", PROMPT)
    cache.free(request)


def test_a_miss_asks_the_store_once():
    store = CountingStore()
    cache = _cache(store)
    request = _request("a")
    assert not cache.loading(request)
    assert cache.admit(request) == 0
    assert store.contains_calls == 1
    cache.free(request)


def test_a_device_match_moved_off_the_probe_asks_the_store_again():
    """Between loading() and admission another request computed the prompt's first 5 blocks,
    past the store's run of 2: the probe cannot say what the store holds from there, so
    admission asks it."""
    store = CountingStore()
    _store_blocks(store, 2)
    cache = _cache(store)
    waiting = _request("waiting")
    assert cache.loading(waiting)
    _wait_until_loaded(cache, waiting)
    shorter = Request(request_id="shorter", prompt=None, prompt_token_ids=PROMPT[: 5 * BS + 1],
                      sampling=SamplingParams(max_tokens=1))
    cached = cache.admit(shorter)  # admitted without loading(): it asks the store itself
    assert cached == 2 * BS and store.contains_calls == 2
    assert cache.allocate_slots(shorter, shorter.num_tokens - cached)
    cache.advance(shorter, shorter.num_tokens - cached)
    cache.free(shorter)
    cache.take_transfers()
    assert cache.admit(waiting) == 5 * BS  # the device's 5 blocks; the store, asked again, has no 6th
    assert store.contains_calls == 3
    cache.free(waiting)


def test_run_from_answers_only_inside_what_was_asked():
    probe = StorageProbe(block_keys.BlockKeyChain(IDENTITY, ""), start=2, held=3)
    assert [probe.run_from(b) for b in range(7)] == [None, None, 3, 2, 1, 0, None]

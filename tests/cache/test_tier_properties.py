"""Stateful property test of the device tree + storage tier, as the cache manager drives them.

A hypothesis state machine plays requests (admit + prefill, decode, finish, policies), store
faults (a record dropped behind the manager's back) and restarts (a new manager and pool over
the same store) against a tiny pool and store, with prefixes colliding across two namespaces.
The tensor side is simulated: each pool block holds bytes, a forward writes into a block the
digest of (namespace, the tokens through that block), and the manager's listed transfers are
applied as the engine's TierIO would (copy out before loads, loads before the forward).

After every step: every block a request reads holds exactly the content of its own tokens and
namespace (never another key's), every stored record is the content of its key, every block the
tree indexes has the right key, ref counts add up, and the store stays within its capacity.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.cache.block_keys import CacheIdentity, prefix_keys
from radixserve.cache.kv_store import KVLayout, KVRecord, MemoryKVStore
from radixserve.cache.manager import KVCacheManager
from radixserve.request import CachePolicy, Request
from radixserve.sampling import SamplingParams

BLOCK = 2
NUM_BLOCKS = 16
LAYOUT = KVLayout("uint8", (1, 2, 1, 1, 8))  # 16 bytes: a digest stands for a block's KV
NAMESPACES = ("a", "b")
IDENTITY = CacheIdentity("model@abc/float32", BLOCK)
STORE_RECORDS = 10
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=11)


def content(namespace: str, tokens: list[int]) -> bytes:
    """What a forward writes into the block ending at tokens[-1]."""
    return hashlib.sha256(f"{namespace}|{tokens}".encode()).digest()[:16]


class FakeHost:
    """The host-RAM tier as HostKVCache behaves (LRU slots by key, protected keys, spill of its
    victims), over bytes: HostKVCache itself is tested in tests/test_host_cache.py."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slots: OrderedDict[bytes, bytes] = OrderedDict()

    def contains(self, keys) -> list[bool]:
        return [k in self.slots for k in keys]


class TierMachine(RuleBasedStateMachine):
    with_host = False

    def __init__(self) -> None:
        super().__init__()
        record_size = len(_encoded_size_probe())
        self.store = MemoryKVStore(IDENTITY.describe(), STORE_RECORDS * record_size)
        self.expected: dict[bytes, bytes] = {}  # block key -> the content it names
        self._new_manager()
        self.next_id = 0
        self.history: list[tuple[str, list[int]]] = []  # prompts seen, for repeats (hits below the device)

    def _new_manager(self) -> None:
        self.host = FakeHost(6) if self.with_host else None  # host RAM does not survive a restart
        self.cache = KVCacheManager(NUM_BLOCKS, BLOCK, "model", identity=IDENTITY, store=self.store,
                                    host=self.host, block_bytes=LAYOUT.nbytes)
        self.cache.cost_model.prefill_tokens_per_s = 1e-6  # always load: exercise the load path
        self.device = [b"\0" * 16] * NUM_BLOCKS  # the simulated pool
        self.running: list[Request] = []

    # ---- the simulated tensor side ---------------------------------------------------------
    def _apply_transfers(self) -> None:
        t = self.cache.take_transfers()
        if self.host is None:
            assert not t.host_loads
        records = []
        to_store = list(t.write_through) if self.host is not None else t.write_back + t.write_through
        for block_id, key in to_store:  # copied out before anything else
            assert self.device[block_id] == self.expected[key], "a block saved under another key"
            records.append(KVRecord(key, IDENTITY.describe(), LAYOUT, bytearray(self.device[block_id])))
        if self.host is not None:
            protected = {k for _, k in t.host_loads}
            for block_id, key in t.write_back:
                assert self.device[block_id] == self.expected[key], "a block saved under another key"
                if key in self.host.slots:
                    continue
                if len(self.host.slots) >= self.host.num_slots:
                    victim = next((k for k in self.host.slots if k not in protected), None)
                    if victim is None:
                        continue
                    records.append(KVRecord(victim, IDENTITY.describe(), LAYOUT, bytearray(self.host.slots.pop(victim))))
                self.host.slots[key] = self.device[block_id]
        self.store.put(records)
        for block_id, key in t.host_loads:
            assert self.host.slots[key] == self.expected[key]
            self.host.slots.move_to_end(key)
            self.device[block_id] = self.host.slots[key]
        for block_id, record in t.store_loads:
            assert bytes(record.payload) == self.expected[record.key]
            self.device[block_id] = bytes(record.payload)

    def _forward(self, request: Request, start: int, end: int) -> None:
        tokens = request.all_token_ids
        blocks = self.cache.kv(request).block_ids
        for i in range(start // BLOCK, -(-end // BLOCK)):
            self.device[blocks[i]] = content(request.namespace, tokens[: min(end, (i + 1) * BLOCK)])

    def _check_reads(self, request: Request, num_tokens: int) -> None:
        """The request's first `num_tokens` (whole blocks) hold its own tokens' content."""
        tokens = request.all_token_ids
        blocks = self.cache.kv(request).block_ids
        for i in range(num_tokens // BLOCK):
            assert self.device[blocks[i]] == content(request.namespace, tokens[: (i + 1) * BLOCK]), \
                f"block {i} of {request.request_id} holds another prefix's KV"

    def _learn_keys(self, request: Request) -> None:
        tokens = request.all_token_ids
        for i, key in enumerate(prefix_keys(IDENTITY, request.namespace, tokens)):
            self.expected[key] = content(request.namespace, tokens[: (i + 1) * BLOCK])

    # ---- rules -----------------------------------------------------------------------------
    @rule(ns=st.sampled_from(NAMESPACES), tokens=tokens_st,
          policy=st.sampled_from([CachePolicy.READ_WRITE] * 3 + [CachePolicy.READ_ONLY, CachePolicy.NONE]))
    def add_and_prefill(self, ns: str, tokens: list[int], policy: CachePolicy) -> None:
        self.history.append((ns, list(tokens)))
        request = Request(f"r{self.next_id}", None, list(tokens), SamplingParams(), namespace=ns, cache_policy=policy)
        self.next_id += 1
        self._learn_keys(request)
        cached = self.cache.admit(request)
        assert cached % BLOCK == 0 and cached <= self.cache.max_cacheable(len(tokens))
        if not policy.reads:
            assert cached == 0
        if not self.cache.allocate_slots(request, len(tokens) - cached):
            self.cache.free(request)  # as the scheduler does: no room this step
            self._apply_transfers()
            return
        self._apply_transfers()
        self._check_reads(request, cached)
        self._forward(request, cached, len(tokens))
        self.cache.advance(request, len(tokens) - cached)
        self.running.append(request)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), suffix=st.lists(st.integers(0, 2), max_size=3),
          policy=st.sampled_from([CachePolicy.READ_WRITE, CachePolicy.READ_ONLY]))
    def repeat(self, data, suffix: list[int], policy: CachePolicy) -> None:
        """An earlier prompt again (a namespace swapped sometimes): after evictions or a
        restart its blocks are found in the store, under its namespace only."""
        ns, tokens = data.draw(st.sampled_from(self.history))
        if data.draw(st.booleans()):
            ns = NAMESPACES[1 - NAMESPACES.index(ns)]
        self.add_and_prefill(ns, tokens + suffix, policy)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token: int) -> None:
        request = data.draw(st.sampled_from(self.running))
        request.output_token_ids.append(token)
        self._learn_keys(request)
        n = request.num_tokens
        if not self.cache.allocate_slots(request, 1):
            request.output_token_ids.pop()
            self._apply_transfers()
            return
        self._apply_transfers()
        self._forward(request, n - 1, n)
        self.cache.advance(request, 1)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data) -> None:
        request = data.draw(st.sampled_from(self.running))
        self.running.remove(request)
        self.cache.free(request)
        self._apply_transfers()

    @rule(data=st.data())
    def drop_a_stored_record(self, data) -> None:
        keys = list(self.store._records) if hasattr(self.store, "_records") else []
        if keys:
            self.store.delete([data.draw(st.sampled_from(keys))])

    @rule()
    def restart(self) -> None:
        """Graceful: the tree is written down (LLMEngine.close), a new process starts empty."""
        for request in list(self.running):
            self.cache.free(request)
        self.running.clear()
        self.cache.list_tree_for_storage()
        self._apply_transfers()
        self._new_manager()

    # ---- invariants --------------------------------------------------------------------------
    @invariant()
    def refs_add_up(self) -> None:
        cache = self.cache
        cache.prefix_cache.check_invariants()
        owners = [0] * NUM_BLOCKS
        for node in cache.prefix_cache.iter_nodes():
            for b in node.block_ids:
                owners[b] += 1
        for request in self.running:
            for b in cache.kv(request).block_ids:
                owners[b] += 1
        assert owners == [cache.pool.ref_count(b) for b in range(NUM_BLOCKS)]

    @invariant()
    def tree_blocks_have_their_own_keys(self) -> None:
        tree_blocks = {b for node in self.cache.prefix_cache.iter_nodes() for b in node.block_ids}
        assert set(self.cache._block_keys) == tree_blocks
        for b, key in self.cache._block_keys.items():
            assert self.device[b] == self.expected[key]

    @invariant()
    def store_holds_only_right_content(self) -> None:
        keys = list(self.store._records)
        for key, record in zip(keys, self.store.get(keys)):
            assert record is not None and bytes(record.payload) == self.expected[key]
        assert self.store.used_bytes <= self.store.capacity_bytes

    @invariant()
    def nothing_pending_between_steps(self) -> None:
        assert not self.cache._transfers


def _encoded_size_probe() -> bytes:
    from radixserve.cache.kv_store import encode_record

    return encode_record(KVRecord(b"\0" * 32, IDENTITY.describe(), LAYOUT, bytearray(LAYOUT.nbytes)))


TierMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_tiers_state_machine = TierMachine.TestCase


class TierMachineWithHost(TierMachine):
    """The same with a host-RAM tier between the device and the store (device -> host -> storage)."""

    with_host = True


TierMachineWithHost.TestCase.settings = TierMachine.TestCase.settings
test_tiers_with_host_state_machine = TierMachineWithHost.TestCase

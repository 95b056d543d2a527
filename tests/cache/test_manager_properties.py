"""Stateful property test of KVCacheManager with forks (n > 1 choices sharing one prefill).

A hypothesis state machine admits requests (all cache policies, caching on and off), runs
batched steps (allocate_slots for several requests, then the step's block copies, then the
K/V writes, then advance, in the order the engine does them), forks finished prefills into
more choices, decodes, frees and evicts. Next to the manager it keeps a model of the K/V
*content*: which token each slot of each block holds. After every step:
- every block's ref count equals its owners (handles holding it, plus the tree);
- every computed position of every live request reads back that request's own token, so no
  write of one choice ever reached another choice's K/V (copy-on-write works) and shared or
  cached blocks hold what they claim;
and once every request is freed, free + cached == total.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixserve.cache.manager import KVCacheManager
from radixserve.request import CachePolicy, Request
from radixserve.sampling import SamplingParams

NUM_BLOCKS = 24
POLICIES = list(CachePolicy)


class ManagerMachine(RuleBasedStateMachine):
    block_size = 2

    @initialize(caching=st.booleans())
    def setup(self, caching: bool) -> None:
        self.cache = KVCacheManager(NUM_BLOCKS, self.block_size, "m", enable_prefix_caching=caching)
        self.content: dict[int, list[int | None]] = {b: [None] * self.block_size for b in range(NUM_BLOCKS)}
        self.live: dict[str, Request] = {}
        self.next_id = 0

    # ---- helpers ------------------------------------------------------------------------
    def new_request(self, prompt: list[int], policy: CachePolicy, outputs: list[int] | None = None) -> Request:
        rid = f"r{self.next_id}"
        self.next_id += 1
        request = Request(request_id=rid, prompt=None, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=1),
                          cache_policy=policy)
        request.output_token_ids = list(outputs or [])
        return request

    def pick(self, data: st.DataObject) -> Request:
        return self.live[data.draw(st.sampled_from(sorted(self.live)))]

    def run_step(self, batch: list[tuple[Request, int]]) -> None:
        """One engine step: allocate (a request that gets no room sits it out), apply the step's
        copies, write the new tokens' K/V by the block tables, advance."""
        scheduled = [(r, n) for r, n in batch if self.cache.allocate_slots(r, n)]
        for src, dst in self.cache.take_block_copies():
            self.content[dst] = list(self.content[src])
        bs = self.block_size
        for request, n in scheduled:
            kv = self.cache.kv(request)
            start = kv.num_computed_tokens
            tokens = request.all_token_ids
            for pos in range(start, start + n):
                self.content[kv.block_ids[pos // bs]][pos % bs] = tokens[pos]
        for request, n in scheduled:
            self.cache.advance(request, n)

    # ---- rules ----------------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < 6)
    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=9), policy=st.sampled_from(POLICIES))
    def admit(self, prompt: list[int], policy: CachePolicy) -> None:
        request = self.new_request(prompt, policy)
        self.cache.admit(request)
        self.live[request.request_id] = request

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """A batch of prefill chunks and decodes (a decode first samples its next token)."""
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=4, unique=True))
        batch = []
        for rid in chosen:
            request = self.live[rid]
            computed = self.cache.num_computed_tokens(request)
            if computed == request.num_tokens:
                if request.num_tokens >= 14:
                    continue  # long enough: keep the pool from filling with one request
                request.output_token_ids.append(data.draw(st.integers(0, 2)))  # sampled
            left = request.num_tokens - computed
            batch.append((request, data.draw(st.integers(1, left))))
        self.run_step(batch)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data: st.DataObject, n: int) -> None:
        """More choices of a request whose tokens are all computed (the engine forks at the end
        of the prefill): they share its blocks."""
        parent = self.pick(data)
        if self.cache.num_computed_tokens(parent) != parent.num_tokens:
            return
        for _ in range(n):
            child = self.new_request(parent.prompt_token_ids, parent.cache_policy, parent.output_token_ids)
            self.cache.fork(parent, child)
            self.live[child.request_id] = child
            assert self.cache.kv(child).block_ids == self.cache.kv(parent).block_ids

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.cache.free(self.live.pop(self.pick(data).request_id))

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        self.cache.prefix_cache.evict(n)

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def refs_match_owners(self) -> None:
        if not hasattr(self, "cache"):
            return
        held: dict[int, int] = {}
        for request in self.live.values():
            for b in self.cache.kv(request).block_ids:
                held[b] = held.get(b, 0) + 1
        tree_blocks = set()
        tree = self.cache.prefix_cache
        if hasattr(tree, "iter_nodes"):
            for node in tree.iter_nodes():
                tree_blocks.update(node.block_ids)
            tree.check_invariants()
        pool = self.cache.pool
        for b in range(NUM_BLOCKS):
            assert pool.ref_count(b) == held.get(b, 0) + (b in tree_blocks), f"block {b}"
        assert self.cache.num_free_blocks() + len(tree_blocks - held.keys()) + len(held) == NUM_BLOCKS

    @invariant()
    def each_request_reads_its_own_tokens(self) -> None:
        if not hasattr(self, "cache"):
            return
        bs = self.block_size
        for request in self.live.values():
            kv = self.cache.kv(request)
            tokens = request.all_token_ids
            for pos in range(kv.num_computed_tokens):
                assert self.content[kv.block_ids[pos // bs]][pos % bs] == tokens[pos], (request.request_id, pos)

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for request in list(self.live.values()):
            self.cache.free(request)
        cache = self.cache
        assert cache.num_free_blocks() + cache.num_cached_blocks() == NUM_BLOCKS, "blocks leaked"
        cache.reset_prefix_cache()
        assert cache.num_free_blocks() == NUM_BLOCKS


class ManagerMachineBlock3(ManagerMachine):
    block_size = 3


_settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestManagerForksBlock2 = ManagerMachine.TestCase
TestManagerForksBlock2.settings = _settings
TestManagerForksBlock3 = ManagerMachineBlock3.TestCase
TestManagerForksBlock3.settings = settings(_settings, max_examples=75)

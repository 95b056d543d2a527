"""Stateful property test of the radix tree over the block pool.

A hypothesis state machine plays requests (match, allocate, insert, lock/unlock, finish) and
admin actions (evict, pin/unpin, clock advance, reset) against a small pool with a tiny token
alphabet, so prefixes collide constantly. Next to the real objects it keeps an independent
model: which (namespace, whole-block prefix) is cached in which block, which requests own which
blocks, which prefixes are locked or pinned. After every step the cache invariants of
shared/DESIGN.md are checked against that model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.cache.block_pool import BlockPool
from radixserve.cache.radix_tree import RadixTree, TreeNode
from radixserve.errors import NoFreeBlocksError

NUM_BLOCKS = 24
NAMESPACES = ("a", "b")
tokens_st = st.lists(st.integers(0, 3), max_size=12)

Key = tuple[str, tuple[int, ...]]  # (namespace, whole-block token prefix)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Req:
    ns: str
    tokens: list[int]
    blocks: list[int]  # block table: this request holds one ref on each
    lock: bool  # whether this request locks its tree node (a well-behaved scheduler does)
    node: TreeNode | None = None  # the locked node, if any
    locked_len: int = 0  # tokens covered by the locked node
    inserted: int = 0  # tokens of this request already inserted


class CacheMachine(RuleBasedStateMachine):
    block_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.pool = BlockPool(NUM_BLOCKS)
        self.tree = RadixTree(self.pool, self.block_size, clock=self.clock)
        self.requests: dict[int, Req] = {}
        self.next_id = 0
        self.cached: dict[Key, int] = {}  # model of the tree's content: prefix -> its last block
        self.pins: dict[Key, float] = {}  # prefix -> until, as pinned through the public API
        self.seen: list[list[int]] = []  # token sequences used so far, to draw shared prefixes from

    def draw_tokens(self, data: st.DataObject) -> list[int]:
        """Random tokens, or (half the time) a prefix of an earlier sequence plus a random tail."""
        if self.seen and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.seen))
            cut = data.draw(st.integers(0, len(base)))
            tokens = base[:cut] + data.draw(st.lists(st.integers(0, 3), max_size=6))
        else:
            tokens = data.draw(tokens_st)
        self.seen.append(tokens)
        del self.seen[:-16]  # a short memory is plenty to collide, and keeps draws cheap
        return tokens

    # ---- model helpers ----------------------------------------------------------------------
    def model_match(self, ns: str, tokens: list[int], limit: int) -> list[int]:
        """Blocks of the longest cached whole-block prefix of tokens[:limit]."""
        bs = self.block_size
        blocks = []
        for j in range(1, limit // bs + 1):
            block = self.cached.get((ns, tuple(tokens[: j * bs])))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def tree_content(self) -> dict[Key, int]:
        """The tree's actual content, in the model's terms (walks the real nodes)."""
        bs = self.block_size
        content: dict[Key, int] = {}
        for node in self.tree.iter_nodes():
            path: list[int] = []
            n: TreeNode | None = node
            while n is not None and n.parent is not None:
                path[:0] = n.tokens
                n = n.parent
            start = len(path) - len(node.tokens)
            for i, block in enumerate(node.block_ids):
                content[(node.namespace, tuple(path[: start + (i + 1) * bs]))] = block
        return content

    def protected(self) -> set[Key]:
        """Cached prefixes that may not be evicted: under a live lock or a live pin."""
        covers: list[Key] = [(r.ns, tuple(r.tokens[: r.locked_len])) for r in self.requests.values() if r.node]
        covers += [k for k, until in self.pins.items() if until > self.clock.now]
        out = set()
        for ns, prefix in covers:
            for j in range(1, len(prefix) // self.block_size + 1):
                out.add((ns, prefix[: j * self.block_size]))
        return out

    def pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.requests)))

    def checked_evict(self, n: int) -> int:
        """tree.evict(n) plus checks that it freed the right blocks in the right order."""
        now = self.clock.now
        free_before = self.pool.num_free()
        protected = self.protected()
        before = dict(self.cached)
        nodes = [(node, (node.last_access, node.access_seq), len(node.block_ids)) for node in self.tree.iter_nodes()]
        leaves = {
            id(node)
            for node, _, _ in nodes
            if not node.children and node.lock_ref == 0 and node.pinned_until <= now
        }

        freed = self.tree.evict(n)

        assert freed == self.pool.num_free() - free_before, "evict must count exactly the blocks it freed"
        assert 0 <= freed <= max(n, 0), "eviction trims leaves, so it never overshoots"
        after = self.tree_content()
        assert after.items() <= before.items(), "eviction only removes"
        removed = before.keys() - after.keys()
        assert not removed & protected, f"evicted locked or pinned prefixes: {removed & protected}"
        self.cached = after
        if freed < n:
            assert not after.keys() - self.protected(), "evict stopped early with evictable blocks left"
        # LRU among evictable leaves, parents only after their children.
        affected = [(node, key) for node, key, nb in nodes if len(node.block_ids) < nb]
        untouched_leaf_keys = [key for node, key, nb in nodes if id(node) in leaves and len(node.block_ids) == nb]
        if affected and untouched_leaf_keys:
            assert max(k for _, k in affected) <= min(untouched_leaf_keys), "not least recently used first"
        for node, _ in affected:
            assert node.parent is None or not node.children, "evicted from a node that still has children"
        return freed

    # ---- requests ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.requests) < 4)
    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), cap_last=st.booleans(), lock=st.booleans())
    def start_request(self, data: st.DataObject, ns: str, cap_last: bool, lock: bool) -> None:
        self.admit(data, ns, cap_last, lock)

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), cap_last=st.booleans(), adopt=st.booleans())
    def serve_whole_request(self, data: st.DataObject, ns: str, cap_last: bool, adopt: bool) -> None:
        """A request's whole life in one step, so the tree fills up with unlocked blocks."""
        rid = self.admit(data, ns, cap_last, lock=True)
        if rid is not None:
            self.insert(self.requests[rid], adopt)
            self.release(self.requests.pop(rid))

    def admit(self, data: st.DataObject, ns: str, cap_last: bool, lock: bool) -> int | None:
        """Match, take refs on the matched blocks, allocate the rest (evicting if short)."""
        tokens = self.draw_tokens(data)
        bs = self.block_size
        limit = max(0, len(tokens) - 1) if cap_last else len(tokens)
        expected = self.model_match(ns, tokens, limit)
        m = self.tree.match_prefix(ns, tokens, max_tokens=limit if cap_last else None)
        assert m.num_tokens == len(expected) * bs and m.block_ids == expected
        assert m.node.depth == m.num_tokens
        req = Req(ns, list(tokens), list(m.block_ids), lock)
        for b in req.blocks:
            self.pool.incref(b)
        if lock:
            self.tree.lock(m.node)
            if not m.node.is_root:
                req.node, req.locked_len = m.node, m.num_tokens
        rid = self.next_id
        self.next_id += 1
        self.requests[rid] = req  # registered before evicting: its lock and refs count already
        needed = -(-len(tokens) // bs) - len(req.blocks)  # the last, partial block is private
        if needed > self.pool.num_free():
            self.checked_evict(needed - self.pool.num_free())
        if needed > self.pool.num_free():
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(needed)
            self.release(self.requests.pop(rid))  # admission failed: give back what the match took
            return None
        req.blocks += self.pool.allocate(needed)
        return rid

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), adopt_tree_blocks=st.booleans())
    def insert_computed(self, data: st.DataObject, adopt_tree_blocks: bool) -> None:
        self.insert(self.requests[self.pick(data)], adopt_tree_blocks)

    def insert(self, req: Req, adopt_tree_blocks: bool) -> None:
        """Insert the request's full blocks, as the engine does once they are computed."""
        bs = self.block_size
        full = len(req.tokens) // bs
        if full * bs <= req.inserted:
            return
        tokens = req.tokens[: full * bs]
        existing = self.model_match(req.ns, tokens, len(tokens))
        res = self.tree.insert(req.ns, tokens, req.blocks[:full])
        k = len(existing)
        assert res.num_existing_tokens == k * bs
        assert res.block_ids == existing + req.blocks[k:full]
        assert res.node.depth == full * bs
        for j in range(k + 1, full + 1):
            self.cached[(req.ns, tuple(tokens[: j * bs]))] = req.blocks[j - 1]
        if adopt_tree_blocks:  # switch to the tree's copies and free duplicates
            for i, tree_block in enumerate(res.block_ids):
                if req.blocks[i] != tree_block:
                    self.pool.incref(tree_block)
                    self.pool.decref(req.blocks[i])
                    req.blocks[i] = tree_block
        if req.lock:
            self.tree.lock(res.node)
            if req.node is not None:
                self.tree.unlock(req.node)
            req.node, req.locked_len = res.node, full * bs
        req.inserted = full * bs

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        self.release(self.requests.pop(self.pick(data)))

    def release(self, req: Req) -> None:
        if req.node is not None:
            self.tree.unlock(req.node)
            req.node = None
        for b in req.blocks:
            self.pool.decref(b)
        req.blocks = []

    # ---- cache operations -------------------------------------------------------------------
    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), cap=st.none() | st.integers(0, 12))
    def match_only(self, data: st.DataObject, ns: str, cap: int | None) -> None:
        tokens = self.draw_tokens(data)
        limit = len(tokens) if cap is None else min(cap, len(tokens))
        expected = self.model_match(ns, tokens, limit)
        m = self.tree.match_prefix(ns, tokens, max_tokens=cap)
        assert m.num_tokens == len(expected) * self.block_size and m.block_ids == expected

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        self.checked_evict(n)

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), ttl=st.floats(0.5, 20))
    def pin(self, data: st.DataObject, ns: str, ttl: float) -> None:
        if self.cached and data.draw(st.booleans()):  # mostly pin something that is cached
            ns, prefix = data.draw(st.sampled_from(sorted(self.cached)))
            tokens = list(prefix) + data.draw(st.lists(st.integers(0, 3), max_size=4))
        else:
            tokens = self.draw_tokens(data)
        until = self.clock.now + ttl
        expected = len(self.model_match(ns, tokens, len(tokens))) * self.block_size
        assert self.tree.pin(ns, tokens, until) == expected
        if expected:
            key = (ns, tuple(tokens[:expected]))
            self.pins[key] = max(self.pins.get(key, until), until)

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), ttl=st.floats(0.5, 20))
    def repin(self, data: st.DataObject, ttl: float) -> None:
        """Pin an already pinned prefix again: extends, never shortens."""
        ns, prefix = data.draw(st.sampled_from(sorted(self.pins)))
        until = self.clock.now + ttl
        # An expired pin's prefix may have been (partly) evicted since.
        expected = len(self.model_match(ns, list(prefix), len(prefix))) * self.block_size
        assert self.tree.pin(ns, list(prefix), until) == expected
        if expected:
            key = (ns, prefix[:expected])
            self.pins[key] = max(self.pins.get(key, until), until)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pins)))
        del self.pins[key]
        self.tree.unpin(key[0], list(key[1]))

    @rule(dt=st.floats(0.1, 10))
    def advance_clock(self, dt: float) -> None:
        self.clock.now += dt

    @rule(roll=st.integers(0, 7))
    def reset(self, roll: int) -> None:
        if roll:  # an admin reset wipes the cache: keep it rare so the tree gets to grow
            return
        free_before = self.pool.num_free()
        freed = self.tree.reset()
        assert freed == self.pool.num_free() - free_before
        self.pins.clear()
        after = self.tree_content()
        assert after.keys() == self.protected(), "reset keeps exactly the locked paths"
        self.cached = after

    # ---- invariants -------------------------------------------------------------------------
    @invariant()
    def cache_is_consistent(self) -> None:
        tree, pool = self.tree, self.pool
        tree.check_invariants()
        assert self.tree_content() == self.cached, "tree content diverged from the model"
        tree_blocks = set(self.cached.values())
        assert len(tree_blocks) == len(self.cached) == tree.num_cached_blocks
        held: dict[int, int] = {}
        for req in self.requests.values():
            assert len(set(req.blocks)) == len(req.blocks)
            for b in req.blocks:
                held[b] = held.get(b, 0) + 1
        for b in range(NUM_BLOCKS):
            owners = held.get(b, 0) + (b in tree_blocks)
            assert pool.ref_count(b) == owners, f"block {b}: ref {pool.ref_count(b)} but {owners} owners"
        num_free = sum(pool.ref_count(b) == 0 for b in range(NUM_BLOCKS))
        assert pool.num_free() == num_free
        tree_only = len(tree_blocks - held.keys())
        assert num_free + tree_only + len(held) == NUM_BLOCKS
        # Locked and live-pinned prefixes are cached; everything else cached is evictable.
        protected = self.protected()
        assert protected <= self.cached.keys(), "a locked or pinned prefix is missing"
        assert tree.num_evictable_blocks() == len(self.cached.keys() - protected)

    @invariant()
    def pinned_paths_are_the_live_pins(self) -> None:
        """What a restart saves (RadixTree.pinned_paths) is every live pin, each edge once."""
        edges = self.tree.pinned_paths()
        paths: list[tuple[int, ...]] = []
        for i, e in enumerate(edges):
            assert -1 <= e.parent < i and (e.parent < 0 or edges[e.parent].namespace == e.namespace)
            paths.append((paths[e.parent] if e.parent >= 0 else ()) + tuple(e.tokens))
        saved = {(e.namespace, paths[i]): e.until for i, e in enumerate(edges) if e.until is not None}
        assert saved == {k: until for k, until in self.pins.items() if until > self.clock.now}
        assert sum(len(e.tokens) for e in edges) == self.tree.pinned_blocks() * self.block_size

    def teardown(self) -> None:
        for rid in list(self.requests):
            self.release(self.requests.pop(rid))
        self.tree.reset()
        assert self.pool.num_free() == NUM_BLOCKS, "blocks leaked"
        assert self.tree.num_cached_blocks == 0 and self.tree.num_nodes == 0
        self.tree.check_invariants()


class CacheMachineBlock1(CacheMachine):
    block_size = 1


class CacheMachineBlock3(CacheMachine):
    block_size = 3


_settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheBlock2 = CacheMachine.TestCase
TestCacheBlock2.settings = _settings
TestCacheBlock1 = CacheMachineBlock1.TestCase
TestCacheBlock1.settings = settings(_settings, max_examples=50)
TestCacheBlock3 = CacheMachineBlock3.TestCase
TestCacheBlock3.settings = settings(_settings, max_examples=50)

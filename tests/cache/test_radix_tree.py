from __future__ import annotations

import pytest

from radixserve.cache.block_pool import BlockPool
from radixserve.cache.radix_tree import InsertResult, RadixTree, TreeNode


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float = 1.0) -> None:
        self.now += dt


def make_tree(block_size: int = 2, num_blocks: int = 64) -> tuple[RadixTree, BlockPool, FakeClock]:
    pool = BlockPool(num_blocks)
    clock = FakeClock()
    return RadixTree(pool, block_size, clock=clock), pool, clock


def cache(tree: RadixTree, tokens: list[int], ns: str = "ns", keep_refs: bool = False) -> InsertResult:
    """What a request does: allocate blocks for the full blocks, compute, insert, finish.

    Unless keep_refs, the request then drops its own refs, so the tree is the only owner left.
    """
    pool = tree.pool
    n = len(tokens) // tree.block_size
    blocks = pool.allocate(n)
    result = tree.insert(ns, tokens[: n * tree.block_size], blocks)
    if not keep_refs:
        for b in blocks:
            pool.decref(b)
    tree.check_invariants()
    return result


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# ---- match ---------------------------------------------------------------------------------


def test_empty_tree_matches_nothing_and_returns_the_root() -> None:
    tree, _, _ = make_tree()
    m = tree.match_prefix("ns", [1, 2, 3, 4])
    assert m.num_tokens == 0 and m.block_ids == []
    assert m.node is tree.root("ns") and m.node.is_root
    assert tree.root("other") is not tree.root("ns")


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_full_and_partial_matches(block_size: int) -> None:
    tree, pool, _ = make_tree(block_size, num_blocks=256)
    tokens = seq(100, 8 * block_size)
    ins = cache(tree, tokens)
    assert ins.num_existing_tokens == 0 and len(ins.block_ids) == 8

    m = tree.match_prefix("ns", tokens)
    assert m.num_tokens == 8 * block_size and m.block_ids == ins.block_ids and m.node is ins.node

    # A longer prompt still matches the cached part; a trailing partial block never matches.
    m = tree.match_prefix("ns", tokens + [7] * (block_size + block_size // 2))
    assert m.num_tokens == 8 * block_size
    m = tree.match_prefix("ns", tokens[: 3 * block_size + block_size // 2 + 0])
    assert m.num_tokens == 3 * block_size and m.block_ids == ins.block_ids[:3]
    tree.check_invariants()


def test_divergence_inside_a_block_matches_whole_blocks_only() -> None:
    tree, _, _ = make_tree(block_size=4)
    ins = cache(tree, seq(0, 16))
    prompt = seq(0, 16)
    prompt[6] = 99  # inside block 1
    m = tree.match_prefix("ns", prompt)
    assert m.num_tokens == 4 and m.block_ids == ins.block_ids[:1]
    # First block differs in its last token: nothing matches.
    prompt = seq(0, 16)
    prompt[3] = 99
    assert tree.match_prefix("ns", prompt).num_tokens == 0


@pytest.mark.parametrize("diverge_block", [1, 2, 5, 7])
def test_divergence_inside_an_edge_splits_it(diverge_block: int) -> None:
    tree, _, _ = make_tree(block_size=2)
    ins = cache(tree, seq(0, 16))  # one edge of 8 blocks
    lower = ins.node
    prompt = seq(0, 16)
    prompt[2 * diverge_block + 1] = 99
    m = tree.match_prefix("ns", prompt)
    assert m.num_tokens == 2 * diverge_block
    assert m.block_ids == ins.block_ids[:diverge_block]
    # The node ends exactly at the match; the original node object keeps the lower part.
    assert m.node.depth == 2 * diverge_block and m.node.tokens == seq(0, 2 * diverge_block)
    assert lower.parent is m.node and lower.depth == 16 and lower.block_ids == ins.block_ids[diverge_block:]
    assert tree.num_nodes == 2
    # The full sequence still matches through the split.
    full = tree.match_prefix("ns", seq(0, 16))
    assert full.num_tokens == 16 and full.block_ids == ins.block_ids and full.node is lower
    tree.check_invariants()


def test_match_at_an_existing_boundary_does_not_split() -> None:
    tree, _, _ = make_tree()
    cache(tree, seq(0, 8))
    cache(tree, seq(0, 4) + [50, 51, 52, 53])  # splits at 4
    assert tree.num_nodes == 3
    m = tree.match_prefix("ns", seq(0, 4) + [9, 9])
    assert m.num_tokens == 4 and tree.num_nodes == 3


def test_max_tokens_cap_rounds_down_and_splits() -> None:
    tree, _, _ = make_tree(block_size=4)
    ins = cache(tree, seq(0, 32))
    for cap, expected in [(0, 0), (3, 0), (4, 4), (13, 12), (31, 28), (32, 32), (1000, 32), (-5, 0)]:
        m = tree.match_prefix("ns", seq(0, 32), max_tokens=cap)
        assert m.num_tokens == expected, cap
        assert m.block_ids == ins.block_ids[: expected // 4]
        if expected:
            assert m.node.depth == expected
    # A full hit capped at len - 1 (the engine recomputes the last token) leaves one block out.
    m = tree.match_prefix("ns", seq(0, 32), max_tokens=31)
    assert m.num_tokens == 28
    tree.check_invariants()


def test_accepts_tuples_and_other_sequences() -> None:
    tree, _, _ = make_tree()
    ins = cache(tree, seq(0, 8))
    assert tree.match_prefix("ns", tuple(seq(0, 8))).block_ids == ins.block_ids
    assert tree.match_prefix("ns", range(0, 8)).num_tokens == 8


def test_namespaces_never_share_nodes_or_blocks() -> None:
    tree, pool, _ = make_tree()
    a = cache(tree, seq(0, 8), ns="tenant-a")
    assert tree.match_prefix("tenant-b", seq(0, 8)).num_tokens == 0
    b = cache(tree, seq(0, 8), ns="tenant-b")
    assert b.num_existing_tokens == 0
    assert set(a.block_ids).isdisjoint(b.block_ids)
    assert tree.match_prefix("tenant-a", seq(0, 8)).block_ids == a.block_ids
    assert tree.match_prefix("tenant-b", seq(0, 8)).block_ids == b.block_ids
    assert {n.namespace for n in tree.iter_nodes("tenant-a")} == {"tenant-a"}
    assert tree.num_cached_blocks == 8


# ---- insert --------------------------------------------------------------------------------


def test_insert_keeps_existing_blocks_and_adopts_only_the_tail() -> None:
    tree, pool, _ = make_tree()
    first = cache(tree, seq(0, 8))
    # A second request computed the same 4-token prefix into its own blocks, plus a new tail.
    own = pool.allocate(4)
    res = tree.insert("ns", seq(0, 4) + [40, 41, 42, 43], own)
    assert res.num_existing_tokens == 4
    assert res.block_ids == first.block_ids[:2] + own[2:]
    assert res.node.depth == 8 and res.node.tokens == [40, 41, 42, 43]
    # Duplicates of cached blocks were not adopted; the tail was.
    assert [pool.ref_count(b) for b in own] == [1, 1, 2, 2]
    assert tree.num_cached_blocks == 4 + 2
    tree.check_invariants()


def test_insert_of_cached_sequence_adopts_nothing() -> None:
    tree, pool, _ = make_tree()
    first = cache(tree, seq(0, 8))
    own = pool.allocate(4)
    res = tree.insert("ns", seq(0, 8), own)
    assert res.num_existing_tokens == 8 and res.block_ids == first.block_ids and res.node is first.node
    assert all(pool.ref_count(b) == 1 for b in own)


def test_insert_of_a_shorter_prefix_splits_so_the_node_ends_there() -> None:
    tree, pool, _ = make_tree()
    first = cache(tree, seq(0, 8))
    res = tree.insert("ns", seq(0, 4), pool.allocate(2))
    assert res.num_existing_tokens == 4 and res.node.depth == 4
    assert res.node.children[(4, 5)] is first.node


def test_insert_continues_a_leaf_as_a_child() -> None:
    tree, _, _ = make_tree()
    first = cache(tree, seq(0, 4))
    res = cache(tree, seq(0, 10))
    assert res.num_existing_tokens == 4 and res.node.parent is first.node
    assert tree.match_prefix("ns", seq(0, 10)).num_tokens == 10


def test_insert_rejects_bad_input_without_changing_anything() -> None:
    tree, pool, _ = make_tree()
    with pytest.raises(ValueError):
        tree.insert("ns", seq(0, 5), pool.allocate(2))
    owned, free_block = pool.allocate(2)
    pool.decref(free_block)
    with pytest.raises(RuntimeError):
        tree.insert("ns", seq(0, 4), [owned, free_block])
    assert pool.ref_count(owned) == 1
    assert tree.num_cached_blocks == 0 and tree.num_nodes == 0
    tree.check_invariants()


def test_empty_insert_returns_root() -> None:
    tree, _, _ = make_tree()
    res = tree.insert("ns", [], [])
    assert res.node is tree.root("ns") and res.block_ids == [] and res.num_existing_tokens == 0


# ---- locks ---------------------------------------------------------------------------------


def test_lock_covers_ancestors_and_survives_splits() -> None:
    tree, _, _ = make_tree()
    a = cache(tree, seq(0, 8))
    b = cache(tree, seq(0, 8) + [70, 71])
    tree.lock(b.node)
    assert b.node.lock_ref == 1 and a.node.lock_ref == 1
    # Splitting a locked edge: the new upper part carries the lock too.
    m = tree.match_prefix("ns", seq(0, 4) + [99, 99])
    assert m.node.lock_ref == 1 and m.node.children[(4, 5)] is a.node
    assert tree.num_evictable_blocks() == 0
    assert tree.evict(100) == 0
    tree.unlock(b.node)
    assert m.node.lock_ref == a.node.lock_ref == b.node.lock_ref == 0
    assert tree.num_evictable_blocks() == 5
    assert tree.evict(100) == 5
    tree.check_invariants()


def test_unlock_without_lock_is_a_bug() -> None:
    tree, _, _ = make_tree()
    a = cache(tree, seq(0, 4))
    with pytest.raises(RuntimeError):
        tree.unlock(a.node)
    tree.lock(a.node)
    tree.unlock(a.node)
    with pytest.raises(RuntimeError):
        tree.unlock(a.node)


def test_lock_of_root_is_a_noop_and_of_an_evicted_node_an_error() -> None:
    tree, _, _ = make_tree()
    root = tree.root("ns")
    tree.lock(root)
    tree.unlock(root)
    a = cache(tree, seq(0, 4))
    tree.evict(10)
    with pytest.raises(RuntimeError):
        tree.lock(a.node)


def test_locked_nodes_are_never_evicted() -> None:
    tree, pool, clock = make_tree(num_blocks=16)
    kept = cache(tree, seq(0, 8))
    tree.lock(kept.node)
    clock.advance()
    cache(tree, seq(100, 8))
    clock.advance()
    cache(tree, seq(200, 8))
    assert tree.evict(100) == 8
    assert all(pool.ref_count(b) == 1 for b in kept.block_ids)
    assert tree.match_prefix("ns", seq(0, 8)).block_ids == kept.block_ids
    tree.unlock(kept.node)
    assert tree.evict(100) == 4
    assert pool.num_free() == 16


# ---- eviction ------------------------------------------------------------------------------


def test_evicts_least_recently_used_first() -> None:
    tree, pool, clock = make_tree()
    a = cache(tree, seq(0, 4))
    clock.advance()
    b = cache(tree, seq(100, 4))
    clock.advance()
    c = cache(tree, seq(200, 4))
    clock.advance()
    tree.match_prefix("ns", seq(0, 4))  # a becomes the most recent
    assert tree.evict(2) == 2
    assert all(pool.is_free(x) for x in b.block_ids)
    assert tree.evict(2) == 2
    assert all(pool.is_free(x) for x in c.block_ids)
    assert tree.match_prefix("ns", seq(0, 4)).block_ids == a.block_ids


def test_lru_ties_on_the_clock_follow_access_order() -> None:
    tree, pool, _ = make_tree()  # the fake clock never moves
    a = cache(tree, seq(0, 2))
    b = cache(tree, seq(100, 2))
    tree.match_prefix("ns", seq(0, 2))
    assert tree.evict(1) == 1 and pool.is_free(b.block_ids[0]) and not pool.is_free(a.block_ids[0])


def test_evict_trims_the_tail_of_a_long_leaf_first() -> None:
    tree, pool, clock = make_tree()
    a = cache(tree, seq(0, 16))  # 8 blocks
    clock.advance()
    b = cache(tree, seq(100, 4))
    assert tree.evict(3) == 3
    # Only the last 3 blocks of the LRU leaf went; its prefix stays cached.
    assert [pool.is_free(x) for x in a.block_ids] == [False] * 5 + [True] * 3
    m = tree.match_prefix("ns", seq(0, 16))
    assert m.num_tokens == 10 and m.node is a.node and a.node.depth == 10
    assert tree.match_prefix("ns", seq(100, 4)).block_ids == b.block_ids
    tree.check_invariants()


def test_parents_go_only_after_their_children() -> None:
    tree, pool, clock = make_tree()
    shared = seq(0, 4)
    x = cache(tree, shared + [10, 11])
    clock.advance()
    y = cache(tree, shared + [20, 21])
    parent = x.node.parent
    assert parent is y.node.parent and parent.block_ids == x.block_ids[:2]
    clock.advance()
    z = cache(tree, seq(100, 2))
    freed_order = []
    for _ in range(5):
        free_before = {b for b in range(pool.num_blocks) if pool.is_free(b)}
        assert tree.evict(1) == 1
        (newly_freed,) = {b for b in range(pool.num_blocks) if pool.is_free(b)} - free_before
        freed_order.append(newly_freed)
        tree.check_invariants()
    # x, then y; only then the shared parent (touched at y's time, so before z), tail block
    # first; z last.
    assert freed_order == [x.block_ids[2], y.block_ids[2], x.block_ids[1], x.block_ids[0], z.block_ids[0]]
    assert tree.num_nodes == 0


def test_parent_becomes_a_candidate_when_its_last_child_goes() -> None:
    tree, pool, clock = make_tree()
    x = cache(tree, seq(0, 4) + [10, 11])
    y = cache(tree, seq(0, 4) + [20, 21])
    parent = x.node.parent
    clock.advance()
    z = cache(tree, seq(100, 2))  # most recent
    assert tree.evict(4) == 4  # x, y, then the 2-block parent
    assert all(pool.is_free(b) for b in x.block_ids + y.block_ids)
    assert parent.parent is None and not pool.is_free(z.block_ids[0])
    assert tree.num_nodes == 1
    tree.check_invariants()


def test_evict_counts_only_blocks_that_went_back_to_the_pool() -> None:
    tree, pool, clock = make_tree(num_blocks=8)
    held = cache(tree, seq(0, 4), keep_refs=True)  # a request still holds these (without a lock)
    clock.advance()
    other = cache(tree, seq(100, 4))
    free_before = pool.num_free()
    # held is the LRU leaf: dropping it frees nothing, so eviction carries on into `other`.
    assert tree.evict(2) == 2
    assert pool.num_free() == free_before + 2
    assert all(pool.ref_count(b) == 1 for b in held.block_ids)  # still the request's
    assert all(pool.is_free(b) for b in other.block_ids)
    assert tree.num_cached_blocks == 0


def test_evict_stops_when_nothing_is_evictable() -> None:
    tree, pool, _ = make_tree(num_blocks=8)
    cache(tree, seq(0, 6))
    assert tree.evict(100) == 3
    assert tree.evict(1) == 0
    assert tree.evict(0) == 0 and pool.num_free() == 8


def test_eviction_heap_stays_consistent_under_many_touches() -> None:
    tree, pool, clock = make_tree(num_blocks=512)
    seqs = [cache(tree, seq(1000 * i, 8)) for i in range(50)]
    for rep in range(2000):
        clock.advance(0.001)
        # Every third touch matches only the first half, which splits each sequence in two.
        tree.match_prefix("ns", seq(1000 * (rep % 50), 8 if rep % 3 else 4))
    tree.check_invariants()
    assert len(tree._evict_heap) <= 2 * tree.num_nodes + 256  # stale entries get compacted
    # Leaves are the lower halves; the one whose full sequence was matched longest ago goes first.
    last_full_touch = {i: max(r for r in range(2000) if r % 50 == i and r % 3) for i in range(50)}
    oldest = min(last_full_touch, key=last_full_touch.__getitem__)
    assert tree.evict(2) == 2
    assert [pool.is_free(b) for b in seqs[oldest].block_ids] == [False, False, True, True]
    tree.check_invariants()


# ---- pins ----------------------------------------------------------------------------------


def test_pinned_prefix_survives_eviction_until_it_expires() -> None:
    tree, pool, clock = make_tree()
    a = cache(tree, seq(0, 8))
    clock.advance()
    b = cache(tree, seq(100, 4))
    assert tree.pin("ns", seq(0, 8), until=10.0) == 8
    assert tree.num_evictable_blocks() == 2
    assert tree.evict(100) == 2  # only b
    assert all(not pool.is_free(x) for x in a.block_ids)
    assert all(pool.is_free(x) for x in b.block_ids)
    clock.now = 9.999
    assert tree.evict(100) == 0
    clock.now = 10.0  # pinned_until <= now: the pin has lapsed
    assert tree.num_evictable_blocks() == 4
    assert tree.evict(100) == 4


def test_reading_a_refreshable_pin_extends_it() -> None:
    tree, _, clock = make_tree()
    cache(tree, seq(0, 8))
    assert tree.pin("ns", seq(0, 8), until=10.0, refresh=10.0) == 8
    clock.now = 8.0
    partial = tree.match_prefix("ns", seq(0, 4))  # reads only part of the pinned path
    tree.refresh_pins(partial.node)
    clock.now = 10.0
    assert tree.num_evictable_blocks() == 4  # lapsed: a partial read does not refresh
    assert tree.pin("ns", seq(0, 8), until=12.0, refresh=10.0) == 8
    clock.now = 11.0
    tree.refresh_pins(tree.match_prefix("ns", seq(0, 8)).node)  # the whole path: until 21
    clock.now = 20.9
    assert tree.evict(100) == 0
    clock.now = 21.0
    assert tree.evict(100) == 4


def test_a_fixed_pin_is_not_refreshed_by_reads() -> None:
    tree, _, clock = make_tree()
    cache(tree, seq(0, 4))
    tree.pin("ns", seq(0, 4), until=5.0)
    clock.now = 4.0
    tree.refresh_pins(tree.match_prefix("ns", seq(0, 4)).node)
    clock.now = 5.0
    assert tree.evict(100) == 2


def test_pin_extends_never_shortens() -> None:
    tree, _, clock = make_tree()
    cache(tree, seq(0, 4))
    assert tree.pin("ns", seq(0, 4), until=20.0) == 4
    assert tree.pin("ns", seq(0, 4), until=5.0) == 4
    clock.now = 10.0
    assert tree.evict(100) == 0
    clock.now = 20.0
    assert tree.evict(100) == 2


def test_pin_of_uncached_or_partly_cached_prefix() -> None:
    tree, _, _ = make_tree()
    assert tree.pin("nobody", seq(0, 4), until=10.0) == 0
    cache(tree, seq(0, 4))
    assert tree.pin("ns", seq(50, 4), until=10.0) == 0
    assert tree.pin("ns", seq(0, 9), until=10.0) == 4  # only full, cached blocks count
    assert tree.evict(100) == 0


def test_pin_inside_an_edge_splits_and_protects_only_the_prefix() -> None:
    tree, pool, _ = make_tree()
    a = cache(tree, seq(0, 12))
    assert tree.pin("ns", seq(0, 4), until=10.0) == 4
    assert tree.num_nodes == 2
    assert tree.num_evictable_blocks() == 4
    assert tree.evict(100) == 4
    assert [pool.is_free(x) for x in a.block_ids] == [False, False, True, True, True, True]
    assert tree.match_prefix("ns", seq(0, 12)).num_tokens == 4
    tree.check_invariants()


def test_pinned_descendant_protects_its_ancestors() -> None:
    tree, pool, clock = make_tree()
    cache(tree, seq(0, 4) + [10, 11])
    y = cache(tree, seq(0, 4) + [20, 21])
    tree.pin("ns", seq(0, 4) + [20, 21], until=10.0)
    # Splitting the pinned path later must not expose the shared prefix.
    tree.match_prefix("ns", seq(0, 2) + [9, 9])
    assert tree.num_evictable_blocks() == 1  # only the [10, 11] leaf
    assert tree.evict(100) == 1
    assert tree.match_prefix("ns", seq(0, 4) + [20, 21]).block_ids == y.block_ids
    clock.now = 10.0
    assert tree.evict(100) == 3


def test_unpin_removes_only_that_pin() -> None:
    tree, pool, _ = make_tree()
    cache(tree, seq(0, 8))
    assert tree.pin("ns", seq(0, 4), until=10.0) == 4  # e.g. a shared system prompt
    assert tree.pin("ns", seq(0, 8), until=10.0) == 8  # and a longer named cache on top
    tree.unpin("ns", seq(0, 8))
    assert tree.num_evictable_blocks() == 2
    assert tree.evict(100) == 2
    assert tree.match_prefix("ns", seq(0, 8)).num_tokens == 4
    tree.unpin("ns", seq(0, 4))
    assert tree.evict(100) == 2
    tree.unpin("ns", seq(0, 4))  # nothing cached: a no-op
    tree.unpin("nobody", seq(0, 4))


def test_unpin_of_a_lapsed_evicted_pin_leaves_a_shorter_pin_alone() -> None:
    tree, pool, clock = make_tree()
    cache(tree, seq(0, 8))
    tree.pin("ns", seq(0, 4), until=20.0)
    tree.pin("ns", seq(0, 8), until=5.0)
    clock.now = 5.0
    assert tree.evict(100) == 2  # the longer pin lapsed, its tail went
    tree.unpin("ns", seq(0, 8))  # late unpin: its node is gone, the shorter pin must survive
    assert tree.evict(100) == 0
    clock.now = 20.0
    assert tree.evict(100) == 2


def test_unpin_of_a_partial_pin_uses_the_pinned_length() -> None:
    tree, _, _ = make_tree()
    cache(tree, seq(0, 4))
    n = tree.pin("ns", seq(0, 8), until=10.0)
    assert n == 4
    tree.unpin("ns", seq(0, 8))  # not the pinned point: no effect
    assert tree.num_evictable_blocks() == 0
    tree.unpin("ns", seq(0, 8)[:n])
    assert tree.num_evictable_blocks() == 2


def test_unpin_where_no_node_ends_is_a_noop() -> None:
    tree, _, _ = make_tree()
    cache(tree, seq(0, 8))
    tree.pin("ns", seq(0, 8), until=10.0)
    tree.unpin("ns", seq(0, 4))  # ends inside the pinned edge: not this pin
    assert tree.evict(100) == 0 and tree.num_nodes == 1


# ---- reset and counters --------------------------------------------------------------------


def test_reset_drops_everything_unlocked() -> None:
    tree, pool, _ = make_tree(num_blocks=32)
    a = cache(tree, seq(0, 8))
    cache(tree, seq(0, 4) + [50, 51])
    cache(tree, seq(100, 6), ns="other")
    tree.pin("ns", seq(0, 4) + [50, 51], until=1e9)
    tree.lock(a.node)
    assert tree.num_cached_blocks == 4 + 1 + 3
    assert tree.num_evictable_blocks() == 3  # a's path locked, [50, 51] pinned
    assert tree.reset() == 4  # pins don't survive an admin reset; locks do
    assert tree.num_cached_blocks == 4 and tree.num_nodes == 2
    assert tree.match_prefix("ns", seq(0, 8)).block_ids == a.block_ids
    tree.unlock(a.node)
    assert tree.reset() == 4
    assert pool.num_free() == 32 and tree.num_cached_blocks == 0 and tree.num_nodes == 0
    tree.check_invariants()


def test_counters_follow_inserts_and_evictions() -> None:
    tree, pool, _ = make_tree()
    assert tree.num_cached_blocks == 0 and tree.num_evictable_blocks() == 0
    r = cache(tree, seq(0, 8))
    assert tree.num_cached_blocks == 4 and tree.num_evictable_blocks() == 4
    tree.lock(r.node)
    assert tree.num_evictable_blocks() == 0
    tree.unlock(r.node)
    tree.evict(1)
    assert tree.num_cached_blocks == 3 and tree.num_evictable_blocks() == 3
    assert pool.num_free() + tree.num_cached_blocks == pool.num_blocks


def test_tree_node_repr_is_short() -> None:
    tree, _, _ = make_tree()
    r = cache(tree, seq(0, 40))
    assert isinstance(r.node, TreeNode)
    assert len(repr(r.node)) < 200


def test_pinned_paths_list_each_pinned_edge_once_parents_first() -> None:
    tree, _, clock = make_tree()  # block_size 2
    cache(tree, seq(0, 8))
    cache(tree, seq(0, 4) + [90, 91, 92, 93])  # branches after 2 blocks
    cache(tree, seq(50, 4))  # never pinned
    cache(tree, seq(0, 6), ns="other")
    assert tree.pinned_paths() == []
    tree.pin("ns", seq(0, 8), until=10.0, refresh=5.0)
    tree.pin("ns", seq(0, 4) + [90, 91, 92, 93], until=20.0)
    tree.pin("ns", seq(0, 2), until=30.0)  # a pin on a prefix of both
    tree.pin("other", seq(0, 6), until=15.0)
    edges = tree.pinned_paths()
    for i, e in enumerate(edges):
        assert e.parent < i
    paths = {}
    for i, e in enumerate(edges):
        paths[i] = (paths[e.parent] if e.parent >= 0 else []) + e.tokens
    pinned = sorted((e.namespace, tuple(paths[i]), e.until, e.refresh) for i, e in enumerate(edges) if e.until)
    assert pinned == [
        ("ns", tuple(seq(0, 2)), 30.0, 0.0),
        ("ns", tuple(seq(0, 8)), 10.0, 5.0),
        ("ns", tuple(seq(0, 4) + [90, 91, 92, 93]), 20.0, 0.0),
        ("other", tuple(seq(0, 6)), 15.0, 0.0),
    ]
    # every pinned block is listed exactly once: the tokens total the pinned blocks
    assert sum(len(e.tokens) for e in edges) == 2 * tree.pinned_blocks()
    clock.now = 12.0  # the refreshable pin lapsed (nobody read it), its edge is gone from the list
    after = tree.pinned_paths()
    assert sum(len(e.tokens) for e in after) == 2 * tree.pinned_blocks()
    assert not any(e.until == 10.0 for e in after)

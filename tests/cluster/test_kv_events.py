"""KV events from a real radix tree: the keys the recorder publishes are exactly the content keys
a router computes from the same tokens, and the index built from them tracks the tree."""

from __future__ import annotations

import random

from radixserve.cache.block_keys import CacheIdentity, prefix_keys
from radixserve.cache.block_pool import BlockPool
from radixserve.cache.radix_tree import RadixTree
from radixserve.cluster.kv_events import REMOVED, STORED, KVEventRecorder
from radixserve.cluster.prefix_index import PrefixIndex

BLOCK_SIZE = 4
IDENTITY = CacheIdentity(model="test-model@abc/float32", block_size=BLOCK_SIZE)


def make_tree(num_blocks: int = 64) -> tuple[RadixTree, KVEventRecorder]:
    tree = RadixTree(BlockPool(num_blocks), BLOCK_SIZE)
    recorder = KVEventRecorder(IDENTITY)
    recorder.attach(tree)
    return tree, recorder


def cache(tree: RadixTree, tokens: list[int], namespace: str = "") -> None:
    """A request's life: allocate, compute, insert, finish (the tree keeps the blocks)."""
    n = len(tokens) // BLOCK_SIZE
    blocks = tree.pool.allocate(n)
    tree.insert("model\x00" + namespace, tokens[: n * BLOCK_SIZE], blocks)
    for b in blocks:
        tree.pool.decref(b)


def tree_keys(tree: RadixTree) -> set[bytes]:
    """Every cached block's key, computed from scratch from each leaf's full token path."""
    keys = set()
    for node in tree.iter_nodes():
        path, n = [], node
        while n.parent is not None:
            path[:0] = n.tokens
            n = n.parent
        namespace = node.namespace.partition("\x00")[2]
        keys.update(prefix_keys(IDENTITY, namespace, path))
    return keys


def test_stored_keys_are_the_prompt_content_keys():
    tree, recorder = make_tree()
    system = list(range(100, 112))
    cache(tree, system + [1, 2, 3, 4])
    cache(tree, system + [5, 6, 7, 8, 9])  # splits the first edge after the shared prefix
    batch = recorder.drain("r1")
    assert batch.seq == 1 and not batch.snapshot
    stored = [k for e in batch.events if e.kind == STORED for k in e.keys]
    expected = set(prefix_keys(IDENTITY, "", system + [1, 2, 3, 4])) | set(prefix_keys(IDENTITY, "", system + [5, 6, 7, 8]))
    assert set(stored) == expected and len(stored) == len(expected)  # each block announced once
    assert recorder.drain("r1").events == [] and recorder.drain("r1").seq == 3


def test_namespaces_give_different_keys():
    tree, recorder = make_tree()
    tokens = list(range(8))
    cache(tree, tokens, namespace="")
    cache(tree, tokens, namespace="salt:a")
    events = recorder.drain("r").events
    assert [e.namespace for e in events] == ["", "salt:a"]
    assert set(events[0].keys).isdisjoint(events[1].keys)
    assert events[1].keys == prefix_keys(IDENTITY, "salt:a", tokens)


def test_eviction_publishes_removals_and_index_follows_the_tree():
    rng = random.Random(0)
    tree, recorder = make_tree(num_blocks=24)
    index = PrefixIndex()
    removals = 0
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(4)]
    for step in range(200):
        tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 9))]
        need = len(tokens) // BLOCK_SIZE
        if tree.pool.num_free() < need:
            tree.evict(need - tree.pool.num_free())
        cache(tree, tokens, namespace=rng.choice(["", "salt:x"]))
        if step % 7 == 0:
            batch = recorder.drain("r1")
            removals += sum(len(e.keys) for e in batch.events if e.kind == REMOVED)
            assert index.apply(batch)
            assert index.replicas["r1"].keys == tree_keys(tree)
    assert index.apply(recorder.drain("r1"))
    assert removals > 0  # the pool was too small for everything: evictions were published
    assert index.replicas["r1"].keys == tree_keys(tree)
    assert index.num_keys == len(tree_keys(tree))


def test_overflow_turns_into_a_snapshot():
    tree, recorder = make_tree()
    recorder.max_pending = 3
    cache(tree, list(range(16)))  # 4 blocks > 3 pending keys
    cache(tree, list(range(100, 108)))
    batch = recorder.drain("r1")
    assert batch.snapshot
    assert {k for e in batch.events for k in e.keys} == tree_keys(tree)
    index = PrefixIndex()
    assert index.apply(batch)  # a snapshot is always accepted
    assert index.replicas["r1"].keys == tree_keys(tree)

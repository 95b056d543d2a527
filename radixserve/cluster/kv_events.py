"""KV events: which full blocks an engine's prefix cache stored or removed, by content key.

``KVEventRecorder`` is a ``TreeObserver`` (cache/tree_observer.py) installed on an engine's radix
tree in cluster mode. For every block that enters or leaves the tree it records the block's
content key (cache/block_keys.py: a sha256 chain rooted in the model identity and the tenant's
namespace), so the router can compute the same keys from a prompt and ask "which replica holds
this prefix?" without ever seeing another replica's tokens.

Events are batched: ``drain()`` hands the pending events over with the next sequence number. The
buffer is bounded; past ``max_pending`` events it drops them and marks the next batch a snapshot
(the whole key set), so a publisher that stalls can never grow it without bound and a consumer
never silently misses a removal.

Cost: one sha256 per newly stored block (the parent's key is memoised per tree node), a dict pop
per removed block. The engine thread pays it inside ``insert``/``evict``; see docs/scaling.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixserve.cache.block_keys import BlockKey, CacheIdentity, block_key, root_key
from radixserve.cache.tree_observer import TreeObserver

if TYPE_CHECKING:
    from radixserve.cache.radix_tree import RadixTree, TreeNode

STORED = "stored"
REMOVED = "removed"


@dataclass(slots=True)
class KVEvent:
    kind: str  # STORED or REMOVED
    namespace: str  # the tenant's cache namespace (key hash + cache_salt), "" for the shared one
    keys: list[BlockKey]  # content keys of the blocks, in prefix order


@dataclass(slots=True)
class EventBatch:
    """What one replica publishes per interval. ``snapshot``: ``events`` is one STORED event per
    namespace listing every block it holds, replacing whatever the consumer knew."""

    replica_id: str
    seq: int
    events: list[KVEvent] = field(default_factory=list)
    snapshot: bool = False
    num_running_tokens: int = 0  # load, for the router: tokens of the replica's running requests
    sent_at: float = 0.0  # wall clock when published (event lag = apply time - sent_at)


def split_tree_namespace(tree_namespace: str) -> str:
    """The tenant namespace inside the tree's (model key NUL namespace), see KVCacheManager.cache_key."""
    return tree_namespace.partition("\x00")[2]


class KVEventRecorder(TreeObserver):
    """Records the radix tree's block changes as content-keyed events (engine thread writes,
    the publisher thread drains: a lock guards the buffer)."""

    def __init__(self, identity: CacheIdentity, max_pending: int = 100_000) -> None:
        self.identity = identity
        self.max_pending = max_pending
        self._pending: list[KVEvent] = []
        self._num_pending_keys = 0
        self._overflowed = False
        self._seq = 0
        self._lock = threading.Lock()
        # id(node) -> (node, depth, key of the node's last block): a node's parent key is looked
        # up here instead of re-hashing the whole path. Valid while node.depth is unchanged (a
        # split keeps the lower part, and so its end, in the original object; a trim changes it).
        self._end_keys: dict[int, tuple[TreeNode, int, BlockKey]] = {}
        self._roots: dict[str, BlockKey] = {}
        self.tree: RadixTree | None = None

    def attach(self, tree: RadixTree) -> None:
        self.tree = tree
        tree.observer = self

    # ---- TreeObserver ---------------------------------------------------------------------
    def blocks_stored(self, node: TreeNode, first_block: int) -> None:
        keys = self._edge_keys(node)
        self._record(KVEvent(STORED, split_tree_namespace(node.namespace), keys[first_block:]))

    def blocks_removed(self, node: TreeNode, first_block: int) -> None:
        keys = self._edge_keys(node)
        if first_block == 0:
            self._end_keys.pop(id(node), None)
        self._record(KVEvent(REMOVED, split_tree_namespace(node.namespace), keys[first_block:]))

    # ---- publishing -------------------------------------------------------------------------
    def drain(self, replica_id: str, num_running_tokens: int = 0, sent_at: float = 0.0) -> EventBatch:
        """The events since the last drain as the next batch (a snapshot after an overflow)."""
        with self._lock:
            events, self._pending, self._num_pending_keys = self._pending, [], 0
            overflowed, self._overflowed = self._overflowed, False
            self._seq += 1
            seq = self._seq
        if overflowed:
            return EventBatch(replica_id, seq, self.snapshot_events(), True, num_running_tokens, sent_at)
        return EventBatch(replica_id, seq, events, False, num_running_tokens, sent_at)

    @property
    def has_pending(self) -> bool:
        """Whether the next drain would carry anything (events, or a snapshot)."""
        with self._lock:
            return bool(self._pending) or self._overflowed

    def request_snapshot(self) -> None:
        """Make the next batch a snapshot (a consumer lost track: it restarted, or saw a gap)."""
        with self._lock:
            self._pending, self._num_pending_keys, self._overflowed = [], 0, True

    def snapshot_events(self) -> list[KVEvent]:
        """Every block the tree holds, one STORED event per namespace. Walks the whole tree: call
        it on the engine thread (AsyncEngine.call), or accept a racy read for a heartbeat."""
        if self.tree is None:
            return []
        by_namespace: dict[str, list[BlockKey]] = {}
        for node in list(self.tree.iter_nodes()):
            if node.block_ids:
                by_namespace.setdefault(split_tree_namespace(node.namespace), []).extend(self._edge_keys(node))
        return [KVEvent(STORED, ns, keys) for ns, keys in by_namespace.items()]

    # ---- keys -------------------------------------------------------------------------------
    def _record(self, event: KVEvent) -> None:
        if not event.keys:
            return
        with self._lock:
            if self._overflowed:
                return  # the next batch is a snapshot anyway
            self._pending.append(event)
            self._num_pending_keys += len(event.keys)
            if self._num_pending_keys > self.max_pending:
                self._pending, self._num_pending_keys, self._overflowed = [], 0, True

    def _edge_keys(self, node: TreeNode) -> list[BlockKey]:
        """Content keys of the blocks on ``node``'s edge, memoising the node's end key."""
        parent = node.parent
        key = self._parent_key(parent, node.namespace) if parent is not None else self._root(node.namespace)
        keys = []
        block_size = self.identity.block_size
        tokens = node.tokens
        for start in range(0, len(node.block_ids) * block_size, block_size):
            key = block_key(key, tokens[start : start + block_size])
            keys.append(key)
        if keys:
            self._end_keys[id(node)] = (node, node.depth, keys[-1])
        return keys

    def _parent_key(self, node: TreeNode, tree_namespace: str) -> BlockKey:
        if node.parent is None:  # a namespace root
            return self._root(tree_namespace)
        entry = self._end_keys.get(id(node))
        if entry is not None and entry[0] is node and entry[1] == node.depth:
            return entry[2]
        return self._edge_keys(node)[-1]

    def _root(self, tree_namespace: str) -> BlockKey:
        key = self._roots.get(tree_namespace)
        if key is None:
            key = self._roots[tree_namespace] = root_key(self.identity, split_tree_namespace(tree_namespace))
        return key

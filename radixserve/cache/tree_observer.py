"""TreeObserver: told when full blocks enter or leave the prefix cache.

The radix tree calls it at the two places where cached content changes (a new leaf in
``insert``; a leaf trimmed or removed by ``evict``/``reset``), and knows nothing else about it.
The base class does nothing, so a tree nobody listens to pays one no-op call per insert or
eviction. Scale-out (radixserve/cluster/kv_events.py) turns these calls into KV events for the
cache-aware router; tier code can observe the same points without touching the tree's walk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixserve.cache.radix_tree import TreeNode


class TreeObserver:
    """Null observer: the default of every RadixTree."""

    __slots__ = ()

    def blocks_stored(self, node: TreeNode, first_block: int) -> None:
        """``node.block_ids[first_block:]`` just entered the cache (the node is attached)."""

    def blocks_removed(self, node: TreeNode, first_block: int) -> None:
        """``node.block_ids[first_block:]`` are about to leave the cache (called before the
        tree changes, so the node's path from its root is still readable)."""


NULL_OBSERVER = TreeObserver()

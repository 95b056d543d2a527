"""Host-RAM and storage tiers below the simulated device pool (``radixserve advise --host-gb --store-gb``).

The policy of issue #13, simulated over content keys (radixserve/cache/block_keys.py: a block's
key names its tokens, everything before them and the namespace):

  - a block the device pool evicts moves down: into the host tier, or straight into storage when
    there is no host tier; a block the host tier evicts moves into storage; storage drops its
    least recently used blocks. Each tier is an LRU over whole blocks.
  - on admission the match continues past the device's, block by block, in the host tier and
    then in storage; it stops at the first block no tier holds (a prefix's KV is only usable up
    to its first gap). A hit refreshes the block's recency in its tier, which keeps its copy
    (the device copy is a copy too, and eviction demotes it again later).
  - found blocks are loaded into the device pool and inserted in the tree exactly as recomputed
    ones would be, so the device tier behaves the same with or without lower tiers.

Whether a load beats recomputing is the TTFT model's question (analyze.tier_costs), not the
replay's: the replay reports what each tier holds when asked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from radixserve.cache.block_keys import BlockKey
from radixserve.cache.radix_tree import RadixTree, TreeNode


class LRUTier:
    """A tier's contents: block keys in least- to most-recently-used order, at most `capacity`."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._keys: OrderedDict[BlockKey, None] = OrderedDict()
        self.evicted_blocks = 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def touch(self, key: BlockKey) -> None:
        self._keys.move_to_end(key)

    def put(self, key: BlockKey) -> BlockKey | None:
        """Hold `key` (most recent). Returns the key it pushed out, if the tier was full."""
        if self.capacity_blocks <= 0:
            return key
        if key in self._keys:
            self._keys.move_to_end(key)
            return None
        self._keys[key] = None
        if len(self._keys) > self.capacity_blocks:
            self.evicted_blocks += 1
            return self._keys.popitem(last=False)[0]
        return None


class LowerTiers:
    """Host then storage, below the device pool."""

    def __init__(self, host_blocks: int, store_blocks: int) -> None:
        self.host = LRUTier(host_blocks)
        self.store = LRUTier(store_blocks)
        self.demoted_to_host = 0
        self.demoted_to_store = 0

    @property
    def enabled(self) -> bool:
        return self.host.capacity_blocks > 0 or self.store.capacity_blocks > 0

    def demote(self, key: BlockKey) -> None:
        """The device pool evicted `key`'s block: move it down (a full tier moves its LRU down)."""
        if self.host.capacity_blocks > 0:
            self.demoted_to_host += 1
            key = self.host.put(key)
            if key is None:
                return
        if self.store.capacity_blocks > 0:
            self.demoted_to_store += 1
            self.store.put(key)

    def lookup(self, keys: Sequence[BlockKey]) -> tuple[int, int]:
        """Continue a match over `keys` (the blocks after the device's match): (blocks found in
        the host tier, blocks found in storage), stopping at the first block neither holds."""
        host = store = 0
        for key in keys:
            if key in self.host:
                self.host.touch(key)
                host += 1
            elif key in self.store:
                self.store.touch(key)
                store += 1
            else:
                break
        return host, store


class DemotingTree(RadixTree):
    """The engine's RadixTree, reporting the blocks it evicts (by block id) to `on_evict`.

    Only the advisor uses it: eviction itself is RadixTree's, unchanged. The two overridden
    methods are where evict() drops blocks (a whole leaf, or the tail of its edge)."""

    def __init__(self, *args, on_evict: Callable[[list[int]], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_evict: Callable[[list[int]], None] | None = on_evict

    def _trim_leaf(self, node: TreeNode, num_blocks: int) -> int:
        if self.on_evict is not None:
            self.on_evict(node.block_ids[len(node.block_ids) - num_blocks:])
        return super()._trim_leaf(node, num_blocks)

    def _remove_leaf(self, node: TreeNode) -> int:
        if self.on_evict is not None:
            self.on_evict(list(node.block_ids))
        return super()._remove_leaf(node)

"""GhostIndex: a bounded memory of recently evicted prefix-cache blocks.

When a request misses, "nothing like it was ever cached" and "it was cached, and evicted" call
for different fixes (more KV memory, a pin, a quota on a noisy neighbour). The tree forgets a
block when it evicts it, so the ghost index remembers, for the most recent ``capacity``
evictions, the block's *chain key*: a hash of its namespace and every token up to the block's
end (a block's KV depends on all of them). A request's first missing block is looked up by the
same key. Memory is bounded (one small entry per remembered block, oldest forgotten first).

Keys are blake2b-128 over (namespace, tokens) chained block by block: computing a request's
keys costs one hash per block, and a tenant cannot craft two prefixes with the same key. The
index is in-process only (nothing is persisted), so keys need no cross-process stability.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Ghost:
    """What the index remembers of one evicted block."""

    evicted_at: float  # clock time of the eviction
    pin_lapsed: bool  # it was pinned (cache_control TTL, a named cache) and the pin had lapsed


def chain_keys(namespace: str, tokens: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """The chain keys of the first ``num_blocks`` full blocks of ``tokens`` in ``namespace``."""
    key = hashlib.blake2b(b"radixserve/ghost-root\x00" + namespace.encode(), digest_size=16).digest()
    keys = []
    for i in range(num_blocks):
        block = array("I", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        key = hashlib.blake2b(key + block, digest_size=16).digest()
        keys.append(key)
    return keys


class GhostIndex:
    """Chain keys of the last ``capacity`` evicted blocks (0: remember nothing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"ghost index capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._ghosts: OrderedDict[bytes, Ghost] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ghosts)

    def remember(self, namespace: str, path_tokens: list[int], block_size: int, first_block: int,
                 ghost: Ghost) -> None:
        """Blocks ``first_block``.. of the path ``path_tokens`` (from the namespace root) were evicted."""
        if not self.capacity:
            return
        num_blocks = len(path_tokens) // block_size
        keys = chain_keys(namespace, path_tokens, block_size, num_blocks)[first_block:]
        ghosts = self._ghosts
        for key in keys[-self.capacity :]:
            ghosts[key] = ghost
            ghosts.move_to_end(key)
        while len(ghosts) > self.capacity:
            ghosts.popitem(last=False)

    def lookup(self, key: bytes) -> Ghost | None:
        """The ghost of the block with this chain key, if it was evicted recently."""
        return self._ghosts.get(key)

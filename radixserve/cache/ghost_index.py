"""GhostIndex: a bounded memory of recently evicted prefix-cache blocks.

When a request misses, "nothing like it was ever cached" and "it was cached, and evicted" call
for different fixes (more KV memory, a pin, a quota on a noisy neighbour). The tree forgets a
block when it evicts it, so the ghost index remembers, for the most recent ``capacity``
evictions, the *prefix key* of the first block each eviction dropped: a hash of the namespace
and every token up to that block's end (a block's KV depends on all of them). A request's first
missing block is looked up by the same key. Memory is bounded (one small entry per eviction,
oldest forgotten first).

Why the first dropped block only: an eviction drops the tail of a path, so a later request
that follows the path misses first at exactly that block; LRU trims a leaf's tail a block at a
time, so a path shrinking block by block has every block recorded. Keying one block per
eviction keeps the cost at one hash over the path's tokens (measured in docs/benchmarks.md,
`trust-cpu`) instead of a hash chain over every block of the path.

Keys are Python's hash of (namespace, tokens): 64 bits, computed in C without serialising the
tokens (2.6x cheaper than blake2b over packed u32s, which doubled the eviction path's cost).
The namespace's string hash is salted per process (PYTHONHASHSEED), so a tenant cannot plan a
collision with another tenant's key; a chance collision (~capacity / 2**64) would only turn a
"not_cached" into "evicted" in a report. The index is in-process only (nothing persisted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Ghost:
    """What the index remembers of one evicted block."""

    evicted_at: float  # clock time of the eviction
    pin_lapsed: bool  # it was pinned (cache_control TTL, a named cache) and the pin had lapsed


def prefix_key(namespace: str, tokens: Sequence[int], end: int) -> int:
    """The key of the block ending at token ``end`` of ``tokens`` in ``namespace``."""
    return hash((namespace, tuple(tokens[:end])))


class GhostIndex:
    """Keys of the first blocks dropped by the last ``capacity`` evictions (0: remember nothing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"ghost index capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._ghosts: OrderedDict[int, Ghost] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ghosts)

    def remember(self, key: int, ghost: Ghost) -> None:
        """The block with prefix key ``key`` was evicted."""
        if not self.capacity:
            return
        ghosts = self._ghosts
        ghosts[key] = ghost
        ghosts.move_to_end(key)
        if len(ghosts) > self.capacity:
            ghosts.popitem(last=False)

    def lookup(self, key: int) -> Ghost | None:
        """The ghost of the block with this prefix key, if it was evicted recently."""
        return self._ghosts.get(key)

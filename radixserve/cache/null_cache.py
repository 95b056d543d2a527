"""NullPrefixCache: the prefix cache when caching is off.

It has the RadixTree methods the KVCacheManager calls, and does nothing: every lookup misses,
an insert keeps nothing (the request keeps its own blocks), nothing is evictable or pinned. So
"caching off" is one choice at construction, not a branch at every call site.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixserve.cache.radix_tree import InsertResult, PrefixMatch


class NullPrefixCache:
    """A prefix cache that never holds anything (same interface as RadixTree)."""

    num_cached_blocks = 0

    def match_prefix(self, namespace: str, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        return PrefixMatch(0, [], None)

    def insert(self, namespace: str, token_ids: Sequence[int], block_ids: Sequence[int]) -> InsertResult:
        # "all of it was there already": nothing adopted, the request keeps its blocks
        return InsertResult(None, len(token_ids), list(block_ids))

    def lock(self, node: object) -> None:
        pass

    def unlock(self, node: object) -> None:
        pass

    def refresh_pins(self, node: object) -> None:
        pass

    def evict(self, num_blocks: int) -> int:
        return 0

    def num_evictable_blocks(self) -> int:
        return 0

    def pin(self, namespace: str, token_ids: Sequence[int], until: float, refresh: float = 0.0) -> int:
        return 0

    def unpin(self, namespace: str, token_ids: Sequence[int]) -> None:
        pass

    def release_pin(self) -> bool:
        return False

    def pinned_blocks(self, namespace: str | None = None) -> int:
        return 0

    def reset(self) -> int:
        return 0

    def check_invariants(self) -> None:
        pass  # holds nothing: nothing can be inconsistent

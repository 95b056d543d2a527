"""KVCacheManager: a request's view of the block pool and the prefix cache.

It decides which blocks a request owns, reuses cached prefixes on admission, inserts newly
computed full blocks into the radix tree, evicts when the pool runs short and returns
everything on finish. Pure bookkeeping over block ids; the runner owns the tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from radixserve.cache.block_pool import BlockPool
from radixserve.cache.null_cache import NullPrefixCache
from radixserve.cache.radix_tree import RadixTree
from radixserve.errors import NoFreeBlocksError
from radixserve.request import Request


@dataclass(slots=True)
class CacheStats:
    """Monotonic counters for the metrics endpoint."""

    queries: int = 0  # admissions that looked up the cache
    query_tokens: int = 0  # prompt tokens looked up
    hits: int = 0  # admissions that reused at least one block
    hit_tokens: int = 0  # tokens reused
    evicted_blocks: int = 0
    inserted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_key: str,
        enable_prefix_caching: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.model_key = model_key
        self.enable_prefix_caching = enable_prefix_caching
        # caching off: a prefix cache that holds nothing (no `is None` branches below)
        self.tree: RadixTree | NullPrefixCache = (
            RadixTree(self.pool, block_size, clock=clock) if enable_prefix_caching else NullPrefixCache()
        )
        self.clock = clock
        self.stats = CacheStats()

    # ---- keys -------------------------------------------------------------------------
    def cache_key(self, namespace: str) -> str:
        """Everything that changes the KV besides the tokens: the model and the tenant's salt."""
        return f"{self.model_key}\x00{namespace}"

    def max_cacheable(self, num_tokens: int) -> int:
        """A full hit still recomputes the last prompt token, so the engine gets its logits."""
        return (num_tokens - 1) // self.block_size * self.block_size

    # ---- admission --------------------------------------------------------------------
    def peek_cached_tokens(self, request: Request) -> int:
        """How many tokens admission would reuse (for cache-aware scheduling)."""
        tokens = request.all_token_ids
        match = self.tree.match_prefix(self.cache_key(request.namespace), tokens, self.max_cacheable(len(tokens)))
        return match.num_tokens

    def admit(self, request: Request) -> int:
        """Give a newly scheduled request the cached prefix of its tokens. Returns tokens reused."""
        assert not request.block_ids and request.tree_node is None
        tokens = request.all_token_ids
        match = self.tree.match_prefix(self.cache_key(request.namespace), tokens, self.max_cacheable(len(tokens)))
        cached = match.num_tokens
        self.pool.incref_all(match.block_ids)
        request.block_ids = list(match.block_ids)
        self.tree.lock(match.node)
        request.tree_node = match.node
        if self.enable_prefix_caching:
            self.stats.queries += 1
            self.stats.query_tokens += len(tokens)
        if cached:
            self.stats.hits += 1
            self.stats.hit_tokens += cached
            self.tree.refresh_pins(match.node)
        request.num_computed_tokens = cached
        request.num_tree_tokens = cached
        return cached

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for the request's next `num_new_tokens` K/V entries; False if the pool can't."""
        needed_blocks = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        missing = needed_blocks - len(request.block_ids)
        if missing <= 0:
            return True
        if missing > self.pool.num_free():
            self.stats.evicted_blocks += self.tree.evict(missing - self.pool.num_free())
        if missing > self.pool.num_free():
            return False
        try:
            request.block_ids.extend(self.pool.allocate(missing))
        except NoFreeBlocksError:
            return False
        return True

    def can_fit(self, num_blocks: int) -> bool:
        free = self.pool.num_free() + self.tree.num_evictable_blocks()
        return num_blocks <= free

    # ---- caching computed blocks ------------------------------------------------------
    def cache_computed(self, request: Request) -> None:
        """Insert the request's computed full blocks into the tree (prompt and output alike).

        Where the tree already holds some of those blocks (an identical prefix computed by
        another request at the same time), the request switches to the tree's copies and
        frees its own, so identical prefixes occupy memory once.
        """
        num_full = request.num_computed_tokens // self.block_size
        if num_full * self.block_size <= request.num_tree_tokens:
            return
        tokens = request.all_token_ids[: num_full * self.block_size]
        result = self.tree.insert(self.cache_key(request.namespace), tokens, request.block_ids[:num_full])
        for i, tree_block in enumerate(result.block_ids):
            own = request.block_ids[i]
            if own != tree_block:
                self.pool.incref(tree_block)
                self.pool.decref(own)
                request.block_ids[i] = tree_block
        self.stats.inserted_blocks += num_full - result.num_existing_tokens // self.block_size
        self.tree.lock(result.node)
        self.tree.unlock(request.tree_node)
        request.tree_node = result.node
        request.num_tree_tokens = num_full * self.block_size

    def pin(self, request: Request, num_tokens: int, ttl: float) -> int:
        """Keep the request's first `num_tokens` cached for `ttl` seconds, refreshed to `ttl`
        again by every later request that reads them all. Returns tokens pinned."""
        tokens = request.all_token_ids[:num_tokens]
        return self.tree.pin(self.cache_key(request.namespace), tokens, self.clock() + ttl, refresh=ttl)

    def pin_prefix(self, namespace: str, token_ids: list[int], ttl: float) -> int:
        """Pin an already cached prefix for `ttl` seconds (named caches). Returns tokens pinned."""
        return self.tree.pin(self.cache_key(namespace), token_ids, self.clock() + ttl)

    def unpin_prefix(self, namespace: str, token_ids: list[int]) -> None:
        self.tree.unpin(self.cache_key(namespace), token_ids)

    # ---- release ----------------------------------------------------------------------
    def free(self, request: Request) -> None:
        """Return a finished, aborted or preempted request's blocks (cached ones stay in the tree)."""
        self.cache_computed(request)
        if request.tree_node is not None:
            self.tree.unlock(request.tree_node)
        self.pool.decref_all(request.block_ids)
        request.block_ids = []
        request.tree_node = None
        request.num_tree_tokens = 0
        request.num_computed_tokens = 0

    def reset_prefix_cache(self) -> int:
        """Drop every cached block no running request uses. Returns blocks freed."""
        freed = self.tree.reset()
        self.stats.evicted_blocks += freed
        return freed

    # ---- gauges -----------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def num_free_blocks(self) -> int:
        return self.pool.num_free()

    def num_cached_blocks(self) -> int:
        return self.tree.num_cached_blocks

    def usage(self) -> float:
        """Fraction of blocks in use by running requests or the cache."""
        return 1.0 - self.pool.num_free() / self.pool.num_blocks

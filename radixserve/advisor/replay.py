"""Replay a request log through the engine's own prefix cache, without a model.

Each request is admitted, prefilled (in chunks of the scheduler's token budget) and freed, one
at a time, by the engine's KVCacheManager over the real BlockPool and RadixTree: the same
match (capped at n-1 tokens), the same block-aligned inserts, the same LRU eviction when the pool
runs short. A request is a real ``Request`` with ``max_tokens=1`` that never decodes, so only its
prompt is computed and cached, as in the engine with ``max_tokens=1``. The prediction therefore
cannot drift from what the engine does when requests do not overlap in time. (Overlapping ones
also share prefixes still being prefilled, and compete for memory: the replay models neither.)

Time: the tree's LRU clock is the log's timestamps (or the request index when the log has none).
A TTL, when given, drops every cached block that went unused for longer before each request, as a
hosted prompt cache does (the engine itself keeps blocks until memory runs short).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from radixserve.advisor.logs import PromptRequest
from radixserve.advisor.tiers import DemotingTree, LowerTiers
from radixserve.cache.block_keys import BlockKey, CacheIdentity, prefix_keys
from radixserve.cache.manager import KVCacheManager
from radixserve.cache.radix_tree import RadixTree
from radixserve.errors import PromptTooLongError
from radixserve.request import Request
from radixserve.sampling import SamplingParams
from radixserve.scheduler import check_fits

# Replays one request at a time, so this only names the cache's key; any constant does.
_MODEL_KEY = "advisor"


@dataclass(slots=True)
class ReplayConfig:
    """The cache being simulated.

    capacity_blocks: KV pool size in blocks (None: large enough that nothing is ever evicted).
    max_num_batched_tokens: the scheduler's per-step budget (prefill chunk size), as in the engine.
    max_model_len: prompts this long or longer are rejected, as the engine does.
    """

    block_size: int = 16
    capacity_blocks: int | None = None
    ttl: float | None = None
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    host_blocks: int = 0  # host-RAM tier below the device pool (0: none); see advisor/tiers.py
    store_blocks: int = 0  # storage tier below that (0: none)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.capacity_blocks is not None and self.capacity_blocks < 1:
            raise ValueError(f"the capacity must be at least one block, got {self.capacity_blocks}")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {self.ttl}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.host_blocks < 0 or self.store_blocks < 0:
            raise ValueError("tier sizes must be >= 0 blocks")


@dataclass(slots=True)
class ReplayResult:
    """What the cache did for each request of the log, and in total."""

    config: ReplayConfig
    num_blocks: int  # pool size actually simulated
    cached_tokens: list[int]  # per request: prompt tokens read from the cache (-1: rejected)
    query_tokens: int = 0  # prompt tokens of the replayed requests
    hit_tokens: int = 0
    hits: int = 0  # requests that reused at least one block
    evicted_blocks: int = 0  # dropped to make room
    expired_blocks: int = 0  # dropped by the TTL
    peak_cached_blocks: int = 0
    rejected: list[int] = field(default_factory=list)  # indices of requests that could not run
    # Lower tiers (zero without them): per request, prompt tokens found past the device match.
    host_tokens: list[int] = field(default_factory=list)
    store_tokens: list[int] = field(default_factory=list)
    host_hit_tokens: int = 0
    store_hit_tokens: int = 0
    demoted_to_host_blocks: int = 0
    demoted_to_store_blocks: int = 0
    dropped_from_host_blocks: int = 0  # pushed out of the host tier (into storage, if any)
    dropped_from_store_blocks: int = 0

    @property
    def num_requests(self) -> int:
        return len(self.cached_tokens) - len(self.rejected)

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens read from the cache (the engine's hit_tokens/query_tokens)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def request_hit_rate(self) -> float:
        """Fraction of requests that reused at least one block."""
        return self.hits / self.num_requests if self.num_requests else 0.0

    @property
    def host_hit_rate(self) -> float:
        """Fraction of prompt tokens found in the host tier (past the device's match)."""
        return self.host_hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def store_hit_rate(self) -> float:
        """Fraction of prompt tokens found in storage (past the device's and the host's)."""
        return self.store_hit_tokens / self.query_tokens if self.query_tokens else 0.0


class _ReplayClock:
    """The tree's clock: the current request's arrival time."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def blocks_to_hold(requests: Sequence[PromptRequest], block_size: int) -> int:
    """A pool size at which nothing is ever evicted: every prompt's blocks, plus one request's."""
    total = sum(-(-(r.num_tokens + 1) // block_size) for r in requests)
    return max(total, 1) + 1


def replay(
    requests: Sequence[PromptRequest],
    config: ReplayConfig,
    progress: Callable[[Iterable[PromptRequest]], Iterable[PromptRequest]] | None = None,
) -> ReplayResult:
    """Run ``requests`` in order through a KVCacheManager of ``config.capacity_blocks`` blocks."""
    block_size = config.block_size
    num_blocks = config.capacity_blocks if config.capacity_blocks is not None else blocks_to_hold(requests, block_size)
    clock = _ReplayClock()
    cache = KVCacheManager(num_blocks, block_size, _MODEL_KEY, enable_prefix_caching=True, clock=clock)
    tiers = LowerTiers(config.host_blocks, config.store_blocks)
    block_keys: dict[int, BlockKey] = {}  # device block id -> content key of the block it holds
    identity = CacheIdentity(_MODEL_KEY, block_size)
    if tiers.enabled:  # the same tree, telling the tiers what it evicts
        cache.prefix_cache = DemotingTree(
            cache.pool, block_size, clock=clock,
            on_evict=lambda ids: [tiers.demote(block_keys.pop(b)) for b in ids if b in block_keys],
        )
    tree = cache.prefix_cache
    assert isinstance(tree, RadixTree)
    result = ReplayResult(config, num_blocks, [0] * len(requests), host_tokens=[0] * len(requests),
                          store_tokens=[0] * len(requests))
    params = SamplingParams(max_tokens=1, temperature=0.0)
    budget = config.max_num_batched_tokens
    ttl = config.ttl
    last_time = -float("inf")
    oldest = -float("inf")  # no cached block was used before this: no TTL sweep needed until then
    iterable: Iterable[PromptRequest] = progress(requests) if progress is not None else requests
    for i, req in enumerate(iterable):
        n = req.num_tokens
        try:  # the engine's own admission check, for a request with max_tokens=1
            check_fits(n, 1, config.max_model_len, block_size, num_blocks)
        except PromptTooLongError:
            result.cached_tokens[i] = -1
            result.rejected.append(i)
            continue
        # Log timestamps can be out of order (several writers); the tree needs a monotonic clock.
        t = float(i) if req.timestamp is None else req.timestamp
        last_time = max(last_time, t)
        clock.now = last_time
        if ttl is not None and clock.now - ttl > oldest:
            expired, oldest_left = _expire(cache, clock.now - ttl, block_keys)
            # Blocks used from now on are at least this recent.
            oldest = min(oldest_left, clock.now)
            result.expired_blocks += expired
        request = Request(
            request_id=str(i), prompt=None, prompt_token_ids=req.token_ids, sampling=params, namespace=req.namespace
        )
        evicted_before = cache.stats.evicted_blocks
        cached = cache.admit(request)
        keys: list[BlockKey] = []
        if tiers.enabled:  # the match continues in the host tier, then in storage
            keys = prefix_keys(identity, req.namespace, req.token_ids)
            first, last = cached // block_size, cache.max_cacheable(n) // block_size
            host, store = tiers.lookup(keys[first:last])
            result.host_tokens[i], result.store_tokens[i] = host * block_size, store * block_size
            result.host_hit_tokens += host * block_size
            result.store_hit_tokens += store * block_size
        # Prefill in chunks of the step budget, caching each chunk's full blocks as the engine
        # does after every step (evictions then interleave with inserts exactly as they do there).
        while (computed := cache.num_computed_tokens(request)) < n:
            num_new = min(n - computed, budget)
            if not cache.allocate_slots(request, num_new):
                break  # cannot happen: everything but this request's own blocks is evictable
            cache.advance(request, num_new)
        result.peak_cached_blocks = max(result.peak_cached_blocks, tree.num_cached_blocks)
        if keys:  # the request's full blocks are the tree's now: remember what each holds
            for block_id, key in zip(cache.kv(request).block_ids, keys):
                block_keys[block_id] = key
        cache.free(request)
        result.evicted_blocks += cache.stats.evicted_blocks - evicted_before
        result.cached_tokens[i] = cached
        result.query_tokens += n
        result.hit_tokens += cached
        result.hits += cached > 0
    result.demoted_to_host_blocks, result.demoted_to_store_blocks = tiers.demoted_to_host, tiers.demoted_to_store
    result.dropped_from_host_blocks = tiers.host.evicted_blocks
    result.dropped_from_store_blocks = tiers.store.evicted_blocks
    return result


def _expire(cache: KVCacheManager, cutoff: float, block_keys: dict[int, BlockKey]) -> tuple[int, float]:
    """Drop every cached block last used before ``cutoff`` (dropped, not demoted to a lower
    tier: the TTL models a hosted prompt cache forgetting the prefix).

    Returns (blocks dropped, the oldest LRU time left in the tree). A node's LRU time is never
    older than any of its descendants' (a match or insert stamps the whole path), so the expired
    nodes are exactly the oldest ones and ``evict`` (LRU, leaves first) takes precisely them
    when asked for their total.
    """
    tree = cache.prefix_cache
    assert isinstance(tree, RadixTree)
    stale = 0
    oldest = float("inf")
    for node in tree.iter_nodes():
        if node.last_access < cutoff and node.lock_ref == 0:
            stale += node.num_blocks
        else:
            oldest = min(oldest, node.last_access)
    if stale == 0:
        return 0, oldest
    if not isinstance(tree, DemotingTree):
        return tree.evict(stale), oldest
    demote, tree.on_evict = tree.on_evict, lambda ids: [block_keys.pop(b, None) for b in ids]
    try:
        return tree.evict(stale), oldest
    finally:
        tree.on_evict = demote

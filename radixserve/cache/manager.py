"""KVCacheManager: the one owner of every request's KV state.

It decides which blocks a request owns, reuses cached prefixes on admission, inserts newly
computed full blocks into the prefix cache, evicts when the pool runs short and returns
everything on finish. Pure bookkeeping over block ids; the runner owns the tensors.

A request's KV state is a `KVHandle` that only this class writes; the scheduler, the engine and
the advisor's replay read it (`kv(request)`) and move it forward through the methods below.
With caching off the prefix cache is a `NullPrefixCache`: same calls, nothing kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from radixserve.cache.block_pool import BlockPool
from radixserve.cache.cache_report import CacheReport, explain_lookup
from radixserve.cache.ghost_index import Ghost, GhostIndex, prefix_key
from radixserve.cache.null_cache import NullPrefixCache
from radixserve.cache.quotas import SCOPE_TENANT, TenantLedger, tenant_of_namespace
from radixserve.cache.radix_tree import PrefixMatch, RadixTree, TreeNode
from radixserve.cache.shared_scopes import SharedScope, SharedScopes
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


@dataclass(slots=True, eq=False)
class KVHandle:
    """A request's KV state. Written by KVCacheManager only; read it, never assign to it.

    Over the request's tokens (prompt + output so far):

        0 ........ num_tree_tokens ........ num_computed_tokens ........ + new ........ num_tokens
        |<- in the tree: shared ->|<- computed, private ->|<- computed this step ->|<- later ->|
        |<------------------------ block_ids (block_size tokens each) ------------------->|

    The tree part is whole blocks, locked (`node`) so it is not evicted under the request.
    A request that read an operator's shared scope has two tree parts:

        0 ... scope_tokens ......... num_tree_tokens ...
        |<- the scope (scope_node) ->|<- cache_key's tree: the request's continuation namespace ->|
    """

    cache_key: str  # the tree namespace its blocks go to: model identity + the request's namespace
    block_ids: list[int]  # the request's block table, in order
    node: TreeNode | None  # deepest tree node the request holds a lock on (None: caching off)
    num_computed_tokens: int  # tokens whose K/V are in block_ids
    num_tree_tokens: int  # leading tokens inserted in the prefix cache (whole blocks)
    scope_node: TreeNode | None = None  # the shared scope's node it holds a lock on (None: no scope)
    scope_tokens: int = 0  # leading tokens read from a shared scope; cache_key's tree starts there


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_key: str,
        enable_prefix_caching: bool = True,
        clock: Callable[[], float] = time.monotonic,
        max_pinned_fraction: float = 1.0,
        max_pinned_fraction_per_namespace: float = 1.0,
        ghost_index_blocks: int = 0,
        tenant_quota_blocks: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.model_key = model_key
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache: RadixTree | NullPrefixCache = (
            RadixTree(self.pool, block_size, clock=clock) if enable_prefix_caching else NullPrefixCache()
        )
        if isinstance(self.prefix_cache, RadixTree):
            # pin bounds (docs/reliability.md): pins never hold more than these shares of the pool
            self.prefix_cache.max_pinned_blocks = int(num_blocks * max_pinned_fraction)
            self.prefix_cache.max_pinned_blocks_per_namespace = int(num_blocks * max_pinned_fraction_per_namespace)
        self.clock = clock
        self.stats = CacheStats()
        self._handles: dict[str, KVHandle] = {}
        tree = self.prefix_cache if isinstance(self.prefix_cache, RadixTree) else None
        # policies beside the tree, listening to its evictions
        self.ghosts = GhostIndex(ghost_index_blocks if tree is not None else 0)
        if tree is not None and ghost_index_blocks:
            tree.eviction_listeners.append(self._remember_eviction)
        self.tenants = TenantLedger(tree, tenant_quota_blocks)
        self.shared_scopes = SharedScopes(model_key)

    # ---- keys and reads -----------------------------------------------------------------
    def cache_key(self, namespace: str) -> str:
        """Everything that changes the KV besides the tokens: the model and the tenant's salt."""
        return f"{self.model_key}\x00{namespace}"

    def max_cacheable(self, num_tokens: int) -> int:
        """A full hit still recomputes the last prompt token, so the engine gets its logits."""
        return (num_tokens - 1) // self.block_size * self.block_size

    def kv(self, request: Request) -> KVHandle:
        """The KV state of an admitted request (KeyError if it holds none)."""
        return self._handles[request.request_id]

    def num_computed_tokens(self, request: Request) -> int:
        """Tokens whose K/V the request holds (0 while it waits)."""
        handle = self._handles.get(request.request_id)
        return handle.num_computed_tokens if handle is not None else 0

    def peek_cached_tokens(self, request: Request) -> int:
        """How many tokens admission would reuse (for cache-aware scheduling)."""
        if not request.cache_policy.reads:
            return 0
        return self._lookup(request, request.all_token_ids).num_tokens

    # ---- admission and growth -----------------------------------------------------------
    def admit(self, request: Request) -> int:
        """Give a newly scheduled request the cached prefix of its tokens. Returns tokens reused.
        At its first admission a request that asked for one gets its CacheReport."""
        assert request.request_id not in self._handles, f"{request.request_id} is already admitted"
        tokens = request.all_token_ids
        reads = request.cache_policy.reads  # a policy that does not read starts from nothing
        if reads:
            lookup = self._lookup(request, tokens)
        else:
            key = self._key(request)
            lookup = _Lookup(key, self.prefix_cache.match_prefix(key, tokens, 0))
        blocks = lookup.block_ids()
        self.pool.incref_all(blocks)
        if lookup.scope_node is not None:
            self.prefix_cache.lock(lookup.scope_node)
        self.prefix_cache.lock(lookup.node)
        cached = lookup.num_tokens
        self._handles[request.request_id] = KVHandle(
            lookup.key, blocks, lookup.node, cached, cached, lookup.scope_node, lookup.scope_tokens,
        )
        if request.want_cache_report and request.cache_report is None:
            request.cache_report = self._report(request, tokens, lookup)
        if self.enable_prefix_caching and reads:
            self.stats.queries += 1
            self.stats.query_tokens += len(tokens)
            self.tenants.record_lookup(tenant_of_namespace(request.namespace), len(tokens), cached)
        if cached:
            self.stats.hits += 1
            self.stats.hit_tokens += cached
            self.prefix_cache.refresh_pins(lookup.node)
            if lookup.scope_node is not None:
                self.prefix_cache.refresh_pins(lookup.scope_node)
        return cached

    def _lookup(self, request: Request, tokens: list[int]) -> _Lookup:
        """The longest cached prefix the request may read: from a shared scope (when its prompt
        starts with a published prefix that is wholly cached) and its continuation namespace,
        or else from its own namespace. Splits edges and refreshes LRU order (match_prefix)."""
        cap = self.max_cacheable(len(tokens))
        key = self._key(request)
        scope = self.shared_scopes.find(tokens, cap) if request.publish_scope is None else None
        if scope is not None:
            shared = self.prefix_cache.match_prefix(self.shared_scopes.scope_key(scope), tokens, scope.num_tokens)
            if shared.num_tokens == scope.num_tokens:
                cont_key = self._register(self.shared_scopes.continuation_key(scope, request.namespace),
                                          tenant_of_namespace(request.namespace))
                rest = self.prefix_cache.match_prefix(cont_key, tokens[scope.num_tokens :], cap - scope.num_tokens)
                return _Lookup(cont_key, rest, shared, scope)
        return _Lookup(key, self.prefix_cache.match_prefix(key, tokens, cap))

    def _report(self, request: Request, tokens: list[int], lookup: _Lookup) -> CacheReport:
        cacheable = self.max_cacheable(len(tokens))
        if not self.enable_prefix_caching or not request.cache_policy.reads:
            reason = "caching_off" if not self.enable_prefix_caching else "opted_out"
            return CacheReport(reason, len(tokens), 0, cacheable)
        offset = lookup.scope_tokens
        readable = [self.cache_key(ns) for ns in request.cache_report_namespaces] if not offset else []
        report = explain_lookup(
            self.prefix_cache, self.ghosts, lookup.key, tokens[offset:], lookup.match,
            cacheable - offset, self.clock(), readable, shared_tokens=offset,
        )
        # explain_lookup saw the tokens after the shared part: count them from the prompt's start
        report.prompt_tokens, report.cached_tokens, report.cacheable_tokens = \
            len(tokens), report.cached_tokens + offset, cacheable
        if report.diverged_at is not None:
            report.diverged_at += offset
        return report

    def _remember_eviction(self, node: TreeNode, num_kept_blocks: int) -> None:
        now = self.clock()
        end = node.depth - len(node.tokens) + (num_kept_blocks + 1) * self.block_size  # first dropped block's end
        pin_lapsed = -float("inf") < node.pinned_until <= now
        path = RadixTree.path_tokens(node)
        self.ghosts.remember(prefix_key(node.namespace, path, end), Ghost(now, pin_lapsed))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for the request's next `num_new_tokens` K/V entries; False if the pool can't
        (even after evicting), in which case nothing changed."""
        handle = self._handles[request.request_id]
        needed_blocks = -(-(handle.num_computed_tokens + num_new_tokens) // self.block_size)
        missing = needed_blocks - len(handle.block_ids)
        if missing <= 0:
            return True
        if missing > self.pool.num_free():
            self.stats.evicted_blocks += self.prefix_cache.evict(missing - self.pool.num_free())
        if missing > self.pool.num_free():
            return False
        try:
            handle.block_ids.extend(self.pool.allocate(missing))
        except NoFreeBlocksError:
            return False
        return True

    def advance(self, request: Request, num_new_tokens: int) -> None:
        """The model computed the request's next `num_new_tokens` (their slots were allocated):
        count them, and insert the full blocks they completed into the prefix cache."""
        handle = self._handles[request.request_id]
        handle.num_computed_tokens += num_new_tokens
        self._insert_full_blocks(request, handle)

    def _insert_full_blocks(self, request: Request, handle: KVHandle) -> None:
        """Insert the computed full blocks past num_tree_tokens (prompt and output alike).

        Where the tree already holds some of those blocks (an identical prefix computed by
        another request at the same time), the request switches to the tree's copies and
        frees its own, so identical prefixes occupy memory once. A request whose cache policy
        does not write keeps its blocks private: free() returns them to the pool unindexed.
        """
        if not request.cache_policy.writes:
            return
        block_size = self.block_size
        num_full = handle.num_computed_tokens // block_size
        if num_full * block_size <= handle.num_tree_tokens:
            return
        first = handle.scope_tokens // block_size  # blocks before it are the shared scope's
        tokens = request.token_slice(handle.scope_tokens, num_full * block_size)
        result = self.prefix_cache.insert(handle.cache_key, tokens, handle.block_ids[first:num_full])
        blocks = handle.block_ids
        for i, tree_block in enumerate(result.block_ids, start=first):
            if blocks[i] != tree_block:
                self.pool.incref(tree_block)
                self.pool.decref(blocks[i])
                blocks[i] = tree_block
        self.stats.inserted_blocks += num_full - first - result.num_existing_tokens // block_size
        self.prefix_cache.lock(result.node)
        self.prefix_cache.unlock(handle.node)
        handle.node = result.node
        handle.num_tree_tokens = num_full * block_size
        self.stats.evicted_blocks += self.tenants.enforce(handle.cache_key)

    # ---- pins -----------------------------------------------------------------------------
    def pin(self, request: Request, num_tokens: int, ttl: float) -> int:
        """Keep the request's first `num_tokens` cached for `ttl` seconds, refreshed to `ttl`
        again by every later request that reads them all. Returns tokens pinned."""
        if not request.cache_policy.writes:
            return 0
        handle = self._handles.get(request.request_id)
        key, offset = (handle.cache_key, handle.scope_tokens) if handle is not None else (self._key(request), 0)
        if num_tokens <= offset:
            return 0  # within an operator's shared scope: the operator pins that, not a tenant
        tokens = request.token_slice(offset, num_tokens)
        return offset + self.prefix_cache.pin(key, tokens, self.clock() + ttl, refresh=ttl)

    def pin_prefix(self, namespace: str, token_ids: list[int], ttl: float) -> int:
        """Pin an already cached prefix for `ttl` seconds (named caches). Returns tokens pinned."""
        return self.prefix_cache.pin(self.cache_key(namespace), token_ids, self.clock() + ttl)

    def unpin_prefix(self, namespace: str, token_ids: list[int]) -> None:
        self.prefix_cache.unpin(self.cache_key(namespace), token_ids)

    def release_pin(self) -> bool:
        """Lift the pin that would lapse first; False if there is none (see RadixTree.release_pin)."""
        return self.prefix_cache.release_pin()

    def pin_bounds(self) -> tuple[int, int] | None:
        """(total, per namespace): the most blocks pins may hold; None with caching off."""
        cache = self.prefix_cache
        if not isinstance(cache, RadixTree) or cache.max_pinned_blocks is None \
                or cache.max_pinned_blocks_per_namespace is None:
            return None
        return cache.max_pinned_blocks, cache.max_pinned_blocks_per_namespace

    def pinned_blocks(self, namespace: str | None = None) -> int:
        """Blocks pins hold now: all of them, or those of one namespace (its cache_key)."""
        return self.prefix_cache.pinned_blocks(namespace)

    # ---- release ----------------------------------------------------------------------
    def free(self, request: Request) -> None:
        """Return a finished, aborted or preempted request's blocks (cached ones stay in the
        tree) and forget its KV state. A request that holds none is ignored."""
        handle = self._handles.pop(request.request_id, None)
        if handle is None:
            return
        self._insert_full_blocks(request, handle)
        self.prefix_cache.unlock(handle.node)
        if handle.scope_node is not None:
            self.prefix_cache.unlock(handle.scope_node)
        self.pool.decref_all(handle.block_ids)

    def reset_prefix_cache(self) -> int:
        """Drop every cached block no running request uses. Returns blocks freed."""
        freed = self.prefix_cache.reset()
        self.stats.evicted_blocks += freed
        return freed

    # ---- gauges -----------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def num_free_blocks(self) -> int:
        return self.pool.num_free()

    def num_cached_blocks(self) -> int:
        return self.prefix_cache.num_cached_blocks

    def usage(self) -> float:
        """Fraction of blocks in use by running requests or the cache."""
        return 1.0 - self.pool.num_free() / self.pool.num_blocks

    def _key(self, request: Request) -> str:
        if request.publish_scope is not None:  # the operator's publishing request
            scope = self.shared_scopes.get(request.publish_scope)
            if scope is None:
                raise KeyError(f"shared scope {request.publish_scope!r} is not published")
            return self._register(self.shared_scopes.scope_key(scope), SCOPE_TENANT)
        return self._register(self.cache_key(request.namespace), tenant_of_namespace(request.namespace))

    def _register(self, key: str, tenant: str) -> str:
        self.tenants.register(key, tenant)
        return key


@dataclass(slots=True)
class _Lookup:
    """What admission may read: a match in `key`'s tree, after a shared scope's match if any."""

    key: str
    match: PrefixMatch = field(default_factory=lambda: PrefixMatch(0, [], None))
    scope_match: PrefixMatch | None = None
    scope: SharedScope | None = None

    @property
    def num_tokens(self) -> int:
        return self.scope_tokens + self.match.num_tokens

    @property
    def scope_tokens(self) -> int:
        return self.scope_match.num_tokens if self.scope_match is not None else 0

    @property
    def node(self) -> TreeNode | None:
        return self.match.node

    @property
    def scope_node(self) -> TreeNode | None:
        return self.scope_match.node if self.scope_match is not None else None

    def block_ids(self) -> list[int]:
        return (self.scope_match.block_ids if self.scope_match is not None else []) + self.match.block_ids

"""KVCacheManager: the one owner of every request's KV state.

It decides which blocks a request owns, reuses cached prefixes on admission, inserts newly
computed full blocks into the prefix cache, evicts when the pool runs short and returns
everything on finish. Pure bookkeeping over block ids; the runner owns the tensors.

A request's KV state is a `KVHandle` that only this class writes; the scheduler, the engine and
the advisor's replay read it (`kv(request)`) and move it forward through the methods below.
With caching off the prefix cache is a `NullPrefixCache`: same calls, nothing kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from radixserve.cache.block_keys import BlockKey, BlockKeyChain, CacheIdentity
from radixserve.cache.block_pool import BlockPool
from radixserve.cache.kv_store import KVStore, NullKVStore
from radixserve.cache.cache_report import CacheReport, explain_lookup
from radixserve.cache.ghost_index import Ghost, GhostIndex, prefix_key
from radixserve.cache.null_cache import NullPrefixCache
from radixserve.cache.prefetch import StorePrefetcher
from radixserve.cache.quotas import SCOPE_TENANT, TenantLedger, tenant_of_namespace
from radixserve.cache.radix_tree import PinnedEdge, PrefixMatch, RadixTree, TreeNode
from radixserve.cache.shared_scopes import SharedScope, SharedScopes
from radixserve.cache.tiers import KeyIndex, LoadCostModel, StorageProbe, TierStats, TierTransfers
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
    forks: int = 0  # handles forked off another request's (n > 1: the choices share one prefill)
    copied_blocks: int = 0  # shared partial blocks copied on write
    partial_hit_tokens: int = 0  # of hit_tokens, those read from the head of a partly matching block

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
    keys: BlockKeyChain | None = None  # content keys of its full blocks (tiers on only)
    num_host_hit_tokens: int = 0  # of the tokens reused at admission, those loaded from host RAM
    num_storage_hit_tokens: int = 0  # ... and from the storage tier
    num_loading_tokens: int = 0  # loaded tokens whose copy into block_ids is still pending (this step)
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
        identity: CacheIdentity | None = None,
        store: KVStore | None = None,
        host: KeyIndex | None = None,
        block_bytes: int = 0,
        write_through_all: bool = False,
        ghost_index_blocks: int = 0,
        tenant_quota_blocks: int | None = None,
        reuse_partial_blocks: bool = False,
    ) -> None:
        self.block_size = block_size
        # admission also reuses the matching head of a partly matching cached block (not with tiers)
        self.reuse_partial_blocks = reuse_partial_blocks
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
        # (src, dst) block copies that the next forward must apply before writing any K/V:
        # copy-on-write of shared partial blocks, drained by the scheduler into its StepInput
        self._block_copies: list[tuple[int, int]] = []
        self._init_policies(model_key, ghost_index_blocks, tenant_quota_blocks)
        self._init_tiers(identity, store, host, block_bytes, write_through_all)

    def _init_policies(self, model_key: str, ghost_index_blocks: int, tenant_quota_blocks: int | None) -> None:
        """Policies beside the tree, listening to its evictions: the ghost index (cache reports),
        the tenant ledger (quotas, per-tenant metrics) and the operator's shared scopes."""
        tree = self.prefix_cache if isinstance(self.prefix_cache, RadixTree) else None
        self.ghosts = GhostIndex(ghost_index_blocks if tree is not None else 0)
        if tree is not None and ghost_index_blocks:
            tree.eviction_listeners.append(self._remember_eviction)
        self.tenants = TenantLedger(tree, tenant_quota_blocks)
        self.shared_scopes = SharedScopes(model_key)

    def _init_tiers(self, identity: CacheIdentity | None, store: KVStore | None, host: KeyIndex | None,
                    block_bytes: int, write_through_all: bool) -> None:
        """Lower tiers (cache/tiers.py): host RAM (`host`, GPU only) and storage (`store`). Off
        unless one is given; then nothing below runs, not even key hashing."""
        self.identity = identity
        self.store = store if store is not None and not isinstance(store, NullKVStore) else None
        self.host = host
        self.tiered = isinstance(self.prefix_cache, RadixTree) and identity is not None \
            and (self.store is not None or host is not None)
        self.block_bytes = block_bytes  # one block's KV, every layer (what a load reads)
        # store every block as it enters the tree, not only on eviction (replicas sharing a store)
        self.write_through_all = write_through_all and self.store is not None
        self.cost_model = LoadCostModel()
        self.tier_stats = TierStats()
        self.load_seconds: deque[tuple[str, float]] = deque(maxlen=4096)  # (tier, s) per load, for /metrics
        self._transfers = TierTransfers()
        self._loading: list[KVHandle] = []  # handles whose loads are in self._transfers
        self._block_keys: dict[int, BlockKey] = {}  # key of each block the tree indexes (tiers on)
        # storage reads of waiting requests run in the background (cache/prefetch.py)
        self.prefetcher = StorePrefetcher(self.store) if self.tiered and self.store is not None else None
        self._probes: dict[str, StorageProbe] = {}  # waiting request id -> what loading() found (admission reuses it)
        if self.tiered:
            assert isinstance(self.prefix_cache, RadixTree)
            self.prefix_cache.on_evict = self._write_back

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

    def computed_tokens(self, requests: list[Request]) -> list[int]:
        """num_computed_tokens of each admitted request, in one call (the scheduler's per-step
        pass over the running requests)."""
        handles = self._handles
        return [handles[r.request_id].num_computed_tokens for r in requests]

    def block_tables(self, requests: list[Request]) -> list[list[int]]:
        """The block table (kv(request).block_ids: read it, never change it) of each admitted
        request, in one call."""
        handles = self._handles
        return [handles[r.request_id].block_ids for r in requests]

    def num_computed_tokens(self, request: Request) -> int:
        """Tokens whose K/V the request holds (0 while it waits)."""
        handle = self._handles.get(request.request_id)
        return handle.num_computed_tokens if handle is not None else 0

    def peek_cached_tokens(self, request: Request) -> int:
        """How many tokens admission would reuse (for cache-aware scheduling)."""
        if not request.cache_policy.reads:
            return 0
        return self._lookup(request, request.all_token_ids).num_tokens

    def loading(self, request: Request) -> bool:
        """True while the storage tier's blocks for this waiting request are read in the
        background: the scheduler admits others meanwhile, then admits it with the records at
        hand. The first call starts the read, if the store holds blocks past the device and
        host match and the cost model predicts loading them beats prefilling them."""
        if self.prefetcher is None or not request.cache_policy.reads:
            return False
        request_id = request.request_id
        if request_id not in self._probes:
            probe = self._probes[request_id] = self._probe_lower_tiers(request)
            if not self._storage_load_pays(probe.held):
                return False
            self.prefetcher.start(request_id, probe.keys.keys[probe.start : probe.start + probe.held])
            return True
        if self.prefetcher.is_reading(request_id):
            return True
        for nbytes, seconds in self.prefetcher.take_samples():
            self._observe_storage_read(nbytes, seconds)
        return False

    def _observe_storage_read(self, nbytes: int, seconds: float) -> None:
        """A storage read's rate for the cost model and its time for the load histogram."""
        self.cost_model.observe_read("storage", nbytes, seconds)
        self.load_seconds.append(("storage", seconds))

    def wait_for_loading(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a background storage read to end (nothing else to run).
        False if no read was running or had just ended: nothing was waited for."""
        return self.prefetcher is not None and self.prefetcher.wait(timeout)

    def _probe_lower_tiers(self, request: Request) -> StorageProbe:
        """Key the request's cacheable blocks and find the store's leading run past the device
        match and the host tier's run (host RAM's blocks come first; they load at admission)."""
        tokens = request.all_token_ids
        keys = BlockKeyChain(self.identity, request.namespace)
        keys.update(tokens[: self.max_cacheable(len(tokens))])
        start = self._lookup(request, tokens).num_tokens // self.block_size
        if start < len(keys.keys) and self.host is not None:
            start += _leading_run(self.host.contains(keys.keys[start:]))
        return StorageProbe(keys, start, _leading_run(self.store.contains(keys.keys[start:])))

    def _storage_load_pays(self, num_blocks: int) -> bool:
        """Whether reading `num_blocks` from storage is predicted faster than prefilling them."""
        load_s = self.cost_model.predicted_load_s("storage", num_blocks * self.block_bytes)
        return num_blocks > 0 and load_s < self.cost_model.predicted_prefill_s(num_blocks * self.block_size)

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
        probe = self._probes.pop(request.request_id, None)  # what loading() found, if it looked
        handle = self._handles[request.request_id] = KVHandle(
            lookup.key, blocks, lookup.node, cached, cached, keys=self._key_chain(request, probe),
            scope_node=lookup.scope_node, scope_tokens=lookup.scope_tokens,
        )
        report = None
        if request.want_cache_report and request.cache_report is None:
            report = request.cache_report = self._report(request, tokens, lookup)
        if reads:  # past the whole blocks matched: the lower tiers, or the head of a partly matching block
            cached += self._admit_from_lower_tiers(tokens, handle, report, probe) if self.tiered else \
                self._reuse_partial_head(tokens, handle, report)
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

    def _key_chain(self, request: Request, probe: StorageProbe | None) -> BlockKeyChain | None:
        """The request's content keys (tiers on only): those loading() hashed, else a new chain."""
        if probe is not None:
            return probe.keys
        return BlockKeyChain(self.identity, request.namespace) if self.tiered else None

    def _reuse_partial_head(self, tokens: list[int], handle: KVHandle, report: CacheReport | None) -> int:
        """Past the whole blocks matched, reuse the leading tokens of a cached block that the
        prompt shares only in part (the block after a system prompt, which the previous
        question filled): the request takes a reference on that tree block as its partial last
        block, and allocate_slots copies it before the forward writes the rest (copy-on-write,
        as for forks), so the tree's block is never written and the tree still holds whole
        blocks only. Returns the tokens reused (0..block_size-1; never the last prompt token,
        whose logits are needed)."""
        if not (self.reuse_partial_blocks and self.enable_prefix_caching):
            return 0
        cached = handle.num_computed_tokens
        room = len(tokens) - 1 - cached
        if room <= 0 or handle.node is None:
            return 0
        block, n = self.prefix_cache.head_match(handle.node, tokens[cached : cached + self.block_size])
        n = min(n, room)
        if n == 0:
            return 0
        self.pool.incref(block)  # held until the copy (or free()); an eviction meanwhile only drops the tree's ref
        handle.block_ids.append(block)
        handle.num_computed_tokens += n
        self.stats.partial_hit_tokens += n
        if report is not None:
            report.cached_tokens += n
        return n

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` (another choice of the same prompt, n > 1) the parent's KV: the same block
        table, one more reference on every block, the same tree lock. Nothing is computed or
        copied now; the partial last block is copied when one of them first writes into it
        (allocate_slots), so n choices cost one prefill."""
        assert child.request_id not in self._handles, f"{child.request_id} is already admitted"
        handle = self._handles[parent.request_id]
        self.pool.incref_all(handle.block_ids)
        self.prefix_cache.lock(handle.node)
        if handle.scope_node is not None:  # free() unlocks it for each choice
            self.prefix_cache.lock(handle.scope_node)
        self._handles[child.request_id] = KVHandle(
            handle.cache_key, list(handle.block_ids), handle.node, handle.num_computed_tokens, handle.num_tree_tokens,
            keys=handle.keys.copy() if handle.keys is not None else None,
            scope_node=handle.scope_node, scope_tokens=handle.scope_tokens,
        )
        self.stats.forks += 1

    def _admit_from_lower_tiers(self, tokens: list[int], handle: KVHandle, report: CacheReport | None,
                                probe: StorageProbe | None) -> int:
        """Continue an admission's device match in host RAM and storage; count the tiers' hits
        (and in the request's new cache report). Returns the tokens loaded."""
        device_tokens, device_blocks = handle.num_computed_tokens, len(handle.block_ids)
        loaded = self._load_from_lower_tiers(tokens, handle, self.max_cacheable(len(tokens)), probe)
        if loaded and report is not None:
            report.add_tier_loads(handle.num_host_hit_tokens, handle.num_storage_hit_tokens)
        self.tier_stats.hit_tokens["device"] += device_tokens
        self.tier_stats.hit_bytes["device"] += device_blocks * self.block_bytes
        return loaded

    def _load_from_lower_tiers(self, tokens: list[int], handle: KVHandle, limit: int,
                               probe: StorageProbe | None) -> int:
        """Continue the device match by content key: host RAM first, then storage, as long as
        each tier holds the next blocks and the cost model says loading them beats prefilling
        them. Found blocks get fresh pool blocks and a load listed for this step. Returns the
        tokens to be loaded (they count as cached).

            0 ... device match ... host blocks ... storage blocks ... limit ... num_tokens
        """
        block_size, loaded = self.block_size, 0
        handle.keys.update(tokens[:limit])  # nothing left to hash where loading() keyed them
        wanted = handle.keys.keys[handle.num_computed_tokens // block_size :]
        for tier, index in (("host", self.host), ("storage", self.store)):
            if not wanted or index is None:
                continue
            n = full = self._leading_run_held(index, wanted, handle.num_computed_tokens // block_size, probe)
            if n == 0:
                continue
            if not self.cost_model.should_load(tier, n * block_size, n * self.block_bytes):
                self.tier_stats.recompute_decisions += 1
                break  # lower tiers are slower still
            self.tier_stats.load_decisions += 1
            records = self._read_storage(wanted[:n]) if tier == "storage" else None
            if records is not None and None in records:
                n = records.index(None)
            blocks = self._allocate_for_load(n)
            n = len(blocks)
            if n == 0:
                break
            self._list_loads(tier, handle, blocks, wanted, records)
            handle.block_ids.extend(blocks)
            handle.num_computed_tokens += n * block_size
            loaded += n * block_size
            if n < full:
                break  # cut short (pool full, corrupt record): prefill the rest
            wanted = wanted[n:]
        if loaded:
            handle.num_loading_tokens = loaded
            self._loading.append(handle)
        return loaded

    def _leading_run_held(self, index: KeyIndex, wanted: list[BlockKey], first: int, probe: StorageProbe | None) -> int:
        """How many of `wanted` (block numbers from `first` on) the tier holds in a row: for the
        store, what it told loading() where that covers them, else (and for host RAM) asked now."""
        known = probe.run_from(first) if probe is not None and index is self.store else None
        return min(known, len(wanted)) if known is not None else _leading_run(index.contains(wanted))

    def _read_storage(self, keys: list[BlockKey]) -> list:
        """The verified records of these keys: those prefetched, the rest read now (a corrupt
        or missing one ends the usable run)."""
        records = self.prefetcher.take(keys) if self.prefetcher is not None else [None] * len(keys)
        first_unread = records.index(None) if None in records else len(records)
        self.tier_stats.prefetched_blocks += first_unread
        if first_unread < len(keys):  # not prefetched (or dropped since): read the rest now
            start = time.perf_counter()
            records[first_unread:] = self.store.get(keys[first_unread:])
            seconds = time.perf_counter() - start
            self._observe_storage_read(sum(len(r.payload) for r in records[first_unread:] if r is not None), seconds)
        if None in records:
            self.tier_stats.short_loads += 1  # missing or corrupt: the rest is prefilled
        return records

    def _list_loads(self, tier: str, handle: KVHandle, blocks: list[int], wanted: list[BlockKey],
                    records: list | None) -> None:
        """List the copies into `blocks` for this step and count them as `tier` hits."""
        n = len(blocks)
        if records is None:
            self._transfers.host_loads.extend(zip(blocks, wanted[:n]))
            handle.num_host_hit_tokens += n * self.block_size
        else:
            self._transfers.store_loads.extend(zip(blocks, records[:n]))
            handle.num_storage_hit_tokens += n * self.block_size
        self.tier_stats.hit_tokens[tier] += n * self.block_size
        self.tier_stats.hit_bytes[tier] += n * self.block_bytes

    def _allocate_for_load(self, num_blocks: int) -> list[int]:
        """Up to `num_blocks` fresh blocks (evicting first); fewer if the pool cannot spare them."""
        if num_blocks > self.pool.num_free():
            self.stats.evicted_blocks += self.prefix_cache.evict(num_blocks - self.pool.num_free())
        return self.pool.allocate(min(num_blocks, self.pool.num_free()))

    def take_transfers(self) -> TierTransfers:
        """The block copies listed since the last call (the engine runs them before the step's
        forward pass). Loads listed now count as done: their blocks may enter the tree."""
        transfers, self._transfers = self._transfers, TierTransfers()
        for handle in self._loading:
            handle.num_loading_tokens = 0
        self._loading.clear()
        return transfers

    def _write_back(self, block_ids: list[int]) -> None:
        """The tree evicts these blocks (still intact): list their copy down a tier."""
        keys = self._block_keys
        saves = [(b, keys.pop(b)) for b in block_ids if b in keys]
        self._transfers.write_back.extend(saves)
        self.tier_stats.saved_blocks += len(saves)

    def list_tree_for_storage(self) -> int:
        """List every block the tree holds for storage (a graceful shutdown: what only the
        device held is then found by the next process). Returns blocks listed."""
        if self.store is None:
            return 0
        saves = [(b, self._block_keys[b]) for node in self.prefix_cache.iter_nodes()
                 for b in node.block_ids if b in self._block_keys]
        self._transfers.write_through.extend(saves)
        return len(saves)

    def detach_tiers(self) -> None:
        """Stop using the lower tiers (their store was closed); nothing pending may be left."""
        assert not self._transfers, "detach_tiers with transfers not yet run"
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        self._probes.clear()
        self.tiered = self.write_through_all = False
        self.store = self.host = None
        self._block_keys.clear()
        if isinstance(self.prefix_cache, RadixTree):
            self.prefix_cache.on_evict = None

    def _write_through(self, namespace_key: str, tokens: list[int]) -> None:
        """A pinned prefix goes to storage now, so a restart or another replica finds it."""
        if self.store is None:
            return
        match = self.prefix_cache.match_prefix(namespace_key, tokens)
        saves = [(b, self._block_keys[b]) for b in match.block_ids if b in self._block_keys]
        self._transfers.write_through.extend(saves)
        self.tier_stats.saved_blocks += len(saves)

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
        (even after evicting), in which case nothing changed.

        A partial last block that another request shares (a fork) is copied first, so that this
        request's writes never reach the other's K/V: the copy goes into `take_block_copies()`."""
        handle = self._handles[request.request_id]
        block_size, computed = self.block_size, handle.num_computed_tokens
        needed_blocks = -(-(computed + num_new_tokens) // block_size)
        missing = max(0, needed_blocks - len(handle.block_ids))
        # a partial block shared with a fork, or with the tree (a reused head): copied first
        tail = computed // block_size
        copy_tail = num_new_tokens > 0 and computed % block_size != 0 and self.pool.ref_count(handle.block_ids[tail]) > 1
        wanted = missing + copy_tail
        if wanted == 0:
            return True
        if wanted > self.pool.num_free():
            self.stats.evicted_blocks += self.prefix_cache.evict(wanted - self.pool.num_free())
        if wanted > self.pool.num_free():
            return False
        try:
            blocks = self.pool.allocate(wanted)
        except NoFreeBlocksError:
            return False
        if copy_tail:
            shared, copy = handle.block_ids[tail], blocks.pop()
            self._block_copies.append((shared, copy))
            handle.block_ids[tail] = copy
            self.pool.decref(shared)  # the other owners keep it
            self.stats.copied_blocks += 1
        handle.block_ids.extend(blocks)
        return True

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies decided since the last call; the runner applies them
        before the step's forward (the scheduler puts them in StepInput.block_copies)."""
        copies, self._block_copies = self._block_copies, []
        return copies

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
        if self.tiered and handle.keys is not None:
            self._key_new_blocks(request, handle, range(first + result.num_existing_tokens // block_size, num_full))
        self.prefix_cache.lock(result.node)
        self.prefix_cache.unlock(handle.node)
        handle.node = result.node
        handle.num_tree_tokens = num_full * block_size
        self.stats.evicted_blocks += self.tenants.enforce(handle.cache_key)

    def _key_new_blocks(self, request: Request, handle: KVHandle, new: range) -> None:
        """Record the content keys of the blocks just inserted (`new`: block numbers over the whole
        prompt, so a shared scope's blocks count too: the keys chain from token 0) and, with
        write-through, list them for storage. handle.block_ids holds the tree's blocks by now."""
        if len(handle.keys.keys) < new.stop:
            handle.keys.update(request.token_slice(0, new.stop * self.block_size))
        keys = handle.keys.keys
        for i in new:
            self._block_keys[handle.block_ids[i]] = keys[i]
        if self.write_through_all:
            self._transfers.write_through.extend((handle.block_ids[i], keys[i]) for i in new)
            self.tier_stats.saved_blocks += len(new)

    # ---- pins -----------------------------------------------------------------------------
    def pin(self, request: Request, num_tokens: int, ttl: float, refresh: float | None = None) -> int:
        """Keep the request's first `num_tokens` cached for `ttl` seconds, refreshed to `refresh`
        (default: `ttl`) again by every later request that reads them all. Returns tokens pinned."""
        if not request.cache_policy.writes:
            return 0
        handle = self._handles.get(request.request_id)
        key, offset = (handle.cache_key, handle.scope_tokens) if handle is not None else (self._key(request), 0)
        if num_tokens <= offset:
            return 0  # within an operator's shared scope: the operator pins that, not a tenant
        tokens = request.token_slice(offset, num_tokens)
        pinned = self.prefix_cache.pin(key, tokens, self.clock() + ttl, refresh=ttl if refresh is None else refresh)
        if pinned and self.tiered:
            self._write_through(key, tokens[:pinned])
        return offset + pinned

    def pin_prefix(self, namespace: str, token_ids: list[int], ttl: float) -> int:
        """Pin an already cached prefix for `ttl` seconds (named caches). Returns tokens pinned."""
        pinned = self.prefix_cache.pin(self.cache_key(namespace), token_ids, self.clock() + ttl)
        if pinned and self.tiered:
            self._write_through(self.cache_key(namespace), token_ids[:pinned])
        return pinned

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

    def pinned_paths(self) -> list[PinnedEdge]:
        """The edges of every live pin's path (RadixTree.pinned_paths), with each namespace as
        requests give it (no model key) and `until` in seconds from now."""
        if not isinstance(self.prefix_cache, RadixTree):
            return []
        now = self.clock()
        prefix = self.cache_key("")
        return [
            dataclasses.replace(e, namespace=e.namespace.removeprefix(prefix),
                                until=None if e.until is None else e.until - now)
            for e in self.prefix_cache.pinned_paths()
        ]

    def pinned_blocks(self, namespace: str | None = None) -> int:
        """Blocks pins hold now: all of them, or those of one namespace (its cache_key)."""
        return self.prefix_cache.pinned_blocks(namespace)

    # ---- release ----------------------------------------------------------------------
    def free(self, request: Request) -> None:
        """Return a finished, aborted or preempted request's blocks (cached ones stay in the
        tree) and forget its KV state. A request that holds none is ignored."""
        self._forget_prefetch(request.request_id)
        handle = self._handles.pop(request.request_id, None)
        if handle is None:
            return
        if handle.num_loading_tokens:
            self._cancel_loads(handle)
        self._insert_full_blocks(request, handle)
        self.prefix_cache.unlock(handle.node)
        if handle.scope_node is not None:
            self.prefix_cache.unlock(handle.scope_node)
        self.pool.decref_all(handle.block_ids)

    def _forget_prefetch(self, request_id: str) -> None:
        if self.prefetcher is not None and self._probes.pop(request_id, None) is not None:
            self.prefetcher.forget(request_id)

    def _cancel_loads(self, handle: KVHandle) -> None:
        """Freed before its loads ran (admitted, then no room this step): its loaded blocks hold
        nothing yet, so they must not enter the tree; they go back to the pool with the rest."""
        pending = set(handle.block_ids)
        t = self._transfers
        t.host_loads = [(b, k) for b, k in t.host_loads if b not in pending]
        t.store_loads = [(b, r) for b, r in t.store_loads if b not in pending]
        handle.num_computed_tokens -= handle.num_loading_tokens
        handle.num_host_hit_tokens = handle.num_storage_hit_tokens = handle.num_loading_tokens = 0
        self._loading.remove(handle)

    def reset_prefix_cache(self) -> int:
        """Drop every cached block no running request uses. Returns blocks freed."""
        freed = self.prefix_cache.reset()
        if self.tiered:  # keep the keys of the blocks still indexed (locked by running requests)
            indexed = {b for node in self.prefix_cache.iter_nodes() for b in node.block_ids}
            self._block_keys = {b: k for b, k in self._block_keys.items() if b in indexed}
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


def _leading_run(present: list[bool]) -> int:
    """How many of the first keys a tier holds, in a row."""
    return present.index(False) if False in present else len(present)

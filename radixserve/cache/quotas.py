"""Tenant budgets of cached blocks, and per-tenant cache counters (policies beside the tree).

A *tenant* is what the cache isolates by: the API-key part of a namespace ("key:<id>", from
auth.Tenant.namespace), all of that key's cache_salts together, so a tenant cannot dodge its
quota by salting. Without per-key isolation every request is the one tenant "" (the shared
cache has no owner per block). Operator scopes (shared prefixes) belong to no tenant: no quota.

The quota is hard: right after a tenant's insert takes it over budget, the tree drops that
tenant's own least recently used unlocked, unpinned blocks until it is back within budget. So a
tenant's flood evicts its own older blocks, never another tenant's prefixes, and an over-quota
tenant is always the first to pay. Blocks its running requests hold stay (they are in use) and
count toward the budget until released.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.cache.radix_tree import RadixTree, TreeNode

SCOPE_TENANT = "shared_scopes"  # label of operator-published shared prefixes (no quota)


def tenant_of_namespace(namespace: str) -> str:
    """The tenant of a request namespace: its "key:<id>" part, or "" when keys do not isolate."""
    first = namespace.split("|", 1)[0]
    return first if first.startswith("key:") else ""


@dataclass(slots=True)
class TenantCacheStats:
    """One tenant's monotonic cache counters."""

    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, read from the cache
    evicted_blocks: int = 0  # its blocks that left the tree (LRU eviction, its quota, a reset)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class TenantLedger:
    """Which tree namespace belongs to which tenant; per-tenant counters; quota enforcement."""

    def __init__(self, tree: RadixTree | None, quota_blocks: int | None = None) -> None:
        if quota_blocks is not None and quota_blocks < 1:
            raise ValueError(f"tenant quota must be >= 1 block, got {quota_blocks}")
        self.tree = tree
        self.quota_blocks = quota_blocks
        self.stats: dict[str, TenantCacheStats] = {}
        self._tenant_of_key: dict[str, str] = {}
        self._keys_of_tenant: dict[str, set[str]] = {}
        if tree is not None:
            tree.eviction_listeners.append(self._on_eviction)

    def register(self, key: str, tenant: str) -> None:
        """Tree namespace ``key`` holds ``tenant``'s blocks."""
        if self._tenant_of_key.get(key) != tenant:
            self._tenant_of_key[key] = tenant
            self._keys_of_tenant.setdefault(tenant, set()).add(key)
            self.stats.setdefault(tenant, TenantCacheStats())

    def record_lookup(self, tenant: str, query_tokens: int, hit_tokens: int) -> None:
        stats = self.stats.setdefault(tenant, TenantCacheStats())
        stats.query_tokens += query_tokens
        stats.hit_tokens += hit_tokens

    def blocks_held(self) -> dict[str, int]:
        """Blocks the tree holds per tenant, now."""
        held: dict[str, int] = {}
        if self.tree is not None:
            for key, n in self.tree.blocks_by_namespace.items():
                tenant = self._tenant_of_key.get(key)
                if tenant is not None:
                    held[tenant] = held.get(tenant, 0) + n
        return held

    def enforce(self, key: str) -> int:
        """After an insert into ``key``: bring its tenant back within quota. Returns blocks dropped."""
        tenant = self._tenant_of_key.get(key)
        if self.quota_blocks is None or self.tree is None or tenant is None or tenant == SCOPE_TENANT:
            return 0
        keys = self._keys_of_tenant[tenant]
        held = sum(self.tree.blocks_by_namespace.get(k, 0) for k in keys)
        if held <= self.quota_blocks:
            return 0
        return self.tree.evict_from(keys, held - self.quota_blocks)

    def _on_eviction(self, node: TreeNode, num_kept_blocks: int) -> None:
        tenant = self._tenant_of_key.get(node.namespace)
        if tenant is not None:
            self.stats[tenant].evicted_blocks += len(node.block_ids) - num_kept_blocks

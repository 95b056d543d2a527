"""CacheReport: how much of a prompt the prefix cache served, and ONE exact reason for the rest.

Computed by the cache manager at a request's first admission, when the request asks for it
(it costs a hash per prompt block and a few dict lookups). The reasons, checked in this order:

    caching_off                 the server runs without a prefix cache
    opted_out                   the request's cache_policy is "none" (reads nothing)
    prompt_shorter_than_block   no full block fits before the last prompt token (always recomputed)
    full_hit                    every cacheable token was read (the rest is the last partial block),
                                from the device or, with tiers, host RAM and storage (`tier_tokens`)
    evicted / ttl_expired       the first missing block was cached and evicted (ttl_expired: its
                                pin had lapsed first); remembered by the ghost index, bounded
    different_namespace         the caller's own unsalted namespace holds a longer prefix: the
                                request's cache_salt kept it apart (never said of another tenant)
    diverged                    the cache holds a continuation of the matched prefix, and the
                                prompt differs from it at token ``diverged_at`` (> 0)
    not_cached                  nothing cached continues the matched prefix (first time seen)

What it never says: anything about a namespace the caller cannot read itself. ``diverged`` gives
the position and the caller's *own* tokens around it, never the cached side, so a report hands
out nothing a caller could not learn by sending prompts in its own namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixserve.cache.ghost_index import Ghost, GhostIndex, prefix_key
from radixserve.cache.radix_tree import PrefixMatch, RadixTree, TreeNode

REASONS = (
    "caching_off", "opted_out", "prompt_shorter_than_block", "full_hit", "evicted", "ttl_expired",
    "different_namespace", "diverged", "not_cached",
)
CONTEXT_TOKENS = 4  # tokens of the caller's own prompt shown on each side of a divergence
MAX_TTL_SCAN_BLOCKS = 64  # later blocks checked for a lapsed pin (bounds a report's hashing)


@dataclass(slots=True)
class CacheReport:
    """One request's cache outcome (see the module docstring for the reasons)."""

    reason: str
    prompt_tokens: int
    cached_tokens: int  # read from the prefix cache
    cacheable_tokens: int  # the most it could have read: whole blocks before its last token
    shared_tokens: int = 0  # of cached_tokens, those read from an operator's shared prefix
    diverged_at: int | None = None  # diverged: index of the first prompt token that differs
    context_before: list[int] = field(default_factory=list)  # the prompt's own tokens before it
    context_after: list[int] = field(default_factory=list)  # ... and from it on
    evicted_seconds_ago: float | None = None  # evicted / ttl_expired
    tier_tokens: dict[str, int] = field(default_factory=dict)  # of cached_tokens, loaded from host RAM / storage

    def add_tier_loads(self, host_tokens: int, storage_tokens: int) -> None:
        """Admission continued the device match in the lower tiers: those tokens were read too.
        The device's reason explained the block after the device match, which is now loaded: a
        full hit says so; otherwise the first block still missing was in no tier (or loading it
        was predicted slower than recomputing it), which is what "not_cached" then reports."""
        self.tier_tokens = {"host": host_tokens, "storage": storage_tokens}
        self.cached_tokens += host_tokens + storage_tokens
        self.reason = "full_hit" if self.cached_tokens >= self.cacheable_tokens else "not_cached"
        self.diverged_at, self.context_before, self.context_after = None, [], []
        self.evicted_seconds_ago = None

    def detail(self) -> str:
        """One sentence for people."""
        r = self.reason
        if r == "caching_off":
            return "the server runs without a prefix cache"
        if r == "opted_out":
            return "cache_policy 'none': this request neither reads nor stores cached blocks"
        if r == "prompt_shorter_than_block":
            return "the prompt is too short to hold one full block before its last token"
        if r == "full_hit":
            return "every cacheable token was read from the cache; the last partial block is always computed"
        if r in ("evicted", "ttl_expired"):
            why = "after its pin lapsed" if r == "ttl_expired" else "to make room"
            return (f"the block after token {self.cached_tokens} was cached and evicted {why}, "
                    f"{self.evicted_seconds_ago:.1f} s ago")
        if r == "different_namespace":
            return "your unsalted namespace holds a longer prefix; this request's cache_salt keeps it apart"
        if r == "diverged":
            return f"the prompt differs from the longest cached prefix at token {self.diverged_at}"
        if self.tier_tokens:
            return (f"no cache tier held the block after token {self.cached_tokens}, or loading it was "
                    "predicted slower than recomputing it")
        return f"nothing cached continues the prompt after token {self.cached_tokens}"

    def to_dict(self, decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
        """The wire form (usage.cache_report, the request log); ``decode`` spells the context."""
        out: dict[str, Any] = {
            "reason": self.reason, "detail": self.detail(), "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "cacheable_tokens": self.cacheable_tokens,
            "missed_tokens": self.prompt_tokens - self.cached_tokens,
        }
        if self.shared_tokens:
            out["shared_tokens"] = self.shared_tokens
        if self.tier_tokens:
            out["tier_tokens"] = dict(self.tier_tokens)
        if self.diverged_at is not None:
            out["diverged_at"] = self.diverged_at
            before, after = self.context_before, self.context_after
            out["context"] = ({"before": decode(before), "after": decode(after)} if decode is not None
                              else {"before_token_ids": before, "after_token_ids": after})
        if self.evicted_seconds_ago is not None:
            out["evicted_seconds_ago"] = round(self.evicted_seconds_ago, 3)
        return out


def explain_lookup(
    tree: RadixTree,
    ghosts: GhostIndex,
    key: str,
    tokens: Sequence[int],
    match: PrefixMatch,
    cacheable: int,
    now: float,
    readable_keys: Sequence[str] = (),
    shared_tokens: int = 0,
) -> CacheReport:
    """The reason a lookup of ``tokens`` in namespace ``key`` matched ``match`` and no more.

    Call it right after the match (before anything can evict). ``readable_keys`` are other
    namespaces the caller may read with another request of its own (its unsalted namespace);
    ``shared_tokens`` is how much of the match came from a shared scope.
    """
    cached = match.num_tokens
    report = CacheReport("not_cached", len(tokens), cached, cacheable, shared_tokens)
    if cacheable == 0:
        report.reason = "prompt_shorter_than_block"
        return report
    if cached >= cacheable:
        report.reason = "full_hit"
        return report
    block_size = tree.block_size
    # keys start at the namespace root, so a shared scope's continuation namespace is keyed
    # from the end of the shared part: the caller passes its tokens from there
    ghost = ghosts.lookup(prefix_key(key, tokens, cached + block_size))
    if ghost is not None:
        _explain_eviction(report, ghosts, ghost, key, tokens, block_size, now)
        return report
    if any(tree.cached_prefix_length(other, tokens, cacheable) > cached for other in readable_keys if other != key):
        report.reason = "different_namespace"
        return report
    _explain_divergence(report, match.node, tokens, block_size)
    return report


def _explain_eviction(report: CacheReport, ghosts: GhostIndex, ghost: Ghost, key: str, tokens: Sequence[int],
                      block_size: int, now: float) -> None:
    """The block after the match was evicted: "ttl_expired" if a pin on it had lapsed."""
    cached, cacheable = report.cached_tokens, report.cacheable_tokens
    # a pin covers its whole path, but only its last node carries it: a lapsed pin on a
    # later block of the prompt (up to MAX_TTL_SCAN_BLOCKS on) means this one was pinned too
    ends = range(cached + 2 * block_size, min(cacheable, cached + MAX_TTL_SCAN_BLOCKS * block_size) + 1, block_size)
    lapsed = ghost.pin_lapsed or any(
        g is not None and g.pin_lapsed for g in (ghosts.lookup(prefix_key(key, tokens, e)) for e in ends))
    report.reason = "ttl_expired" if lapsed else "evicted"
    report.evicted_seconds_ago = max(0.0, now - ghost.evicted_at)


def _explain_divergence(report: CacheReport, node: TreeNode | None, tokens: Sequence[int], block_size: int) -> None:
    """"diverged" (with context) where the next block shares a head with a cached sibling."""
    cached = report.cached_tokens
    next_block = list(tokens[cached : cached + block_size])
    common = max((_common_prefix(next_block, list(child)) for child in node.children), default=0) if node else 0
    if cached + common > 0 and node is not None and node.children:
        report.reason = "diverged"
        report.diverged_at = at = cached + common
        report.context_before = list(tokens[max(0, at - CONTEXT_TOKENS) : at])
        report.context_after = list(tokens[at : at + CONTEXT_TOKENS])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

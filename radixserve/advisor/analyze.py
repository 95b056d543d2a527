"""The advisor's pipeline: replay, capacity curve, findings, prefix tree -> AdviceReport."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from radixserve.advisor.curve import CapacityCurve, capacity_curve
from radixserve.advisor.findings import (
    SEVERITY_ORDER,
    Finding,
    divergence_findings,
    find_divergences,
    prefix_findings,
    prefix_overlaps,
    reorder_for_caching,
    template_head_tokens,
)
from radixserve.advisor.logs import LoadedLog, PromptRequest
from radixserve.advisor.model_info import ModelInfo
from radixserve.advisor.prefix_tree import build_prefix_tree, top_shared_prefixes
from radixserve.advisor.replay import ReplayConfig, ReplayResult, replay
from radixserve.advisor.report import AdviceReport, Savings, human_bytes
from radixserve.advisor.tier_costs import DEFAULT_HOST_GBPS, DEFAULT_STORE_GBPS, predict_tiers, tier_findings

# A loss is worth a finding when it is at least this fraction of all prompt tokens.
_MIN_LOSS_FRACTION = 0.02


@dataclass(slots=True)
class AdvisorConfig:
    """What to simulate and how to price it.

    Capacity: ``capacity_tokens``, or ``capacity_bytes`` of KV memory (converted with the model's
    KV bytes per token), or neither for a cache that never evicts. ``cached_discount`` is the
    fraction of the input price a cached token does *not* cost (0.9: cached tokens cost 10%).
    ``min_prefix_tokens`` flags shared prefixes shorter than this (e.g. 1024, the minimum that
    explicit cache breakpoints and hosted APIs accept); ``min_shared_tokens`` is the shortest
    shared span the early-divergence search reports.
    """

    block_size: int = 16
    capacity_tokens: int | None = None
    capacity_bytes: int | None = None
    ttl: float | None = None
    prefill_tokens_per_s: float | None = None
    prefill_rate_source: str = "given"  # "given" | "measured"
    cached_discount: float = 0.9
    price_per_mtok: float | None = None
    min_prefix_tokens: int = 0
    min_shared_tokens: int = 64
    max_num_batched_tokens: int = 2048
    curve_points: int = 10
    curve_target: float = 0.95
    top_prefixes: int = 5
    # Tiers below the device pool (advisor/tiers.py), in bytes of KV; None: no such tier.
    host_bytes: int | None = None
    store_bytes: int | None = None
    host_gbps: float = DEFAULT_HOST_GBPS  # host -> device copy bandwidth, GB/s (10^9 B)
    store_gbps: float = DEFAULT_STORE_GBPS  # storage read bandwidth, GB/s

    def __post_init__(self) -> None:
        if self.capacity_tokens is not None and self.capacity_bytes is not None:
            raise ValueError("give the capacity in tokens or in bytes, not both")
        if not 0.0 <= self.cached_discount <= 1.0:
            raise ValueError(f"cached_discount must be within [0, 1], got {self.cached_discount}")
        if self.prefill_tokens_per_s is not None and self.prefill_tokens_per_s <= 0:
            raise ValueError("the prefill rate must be > 0 tokens/s")
        if self.price_per_mtok is not None and self.price_per_mtok < 0:
            raise ValueError("the price must be >= 0")
        if self.min_prefix_tokens < 0 or self.min_shared_tokens < 1:
            raise ValueError("min_prefix_tokens must be >= 0 and min_shared_tokens >= 1")
        if any(b is not None and b < 0 for b in (self.host_bytes, self.store_bytes)):
            raise ValueError("tier sizes must be >= 0")
        if not (self.host_gbps > 0 and self.store_gbps > 0):
            raise ValueError("tier bandwidths must be > 0 GB/s")

    def tier_blocks(self, kv_bytes_per_token: int) -> tuple[int, int]:
        """(host, storage) tier sizes in whole blocks (0: no such tier)."""
        block_bytes = kv_bytes_per_token * self.block_size
        host, store = (int((b or 0) // block_bytes) for b in (self.host_bytes, self.store_bytes))
        return host, store

    def capacity_blocks(self, kv_bytes_per_token: int) -> int | None:
        """The pool size in blocks (rounded down, as the engine sizes its pool), None if unbounded."""
        if self.capacity_tokens is not None:
            blocks = self.capacity_tokens // self.block_size
        elif self.capacity_bytes is not None:
            blocks = int(self.capacity_bytes // (kv_bytes_per_token * self.block_size))
        else:
            return None
        if blocks < 1:
            raise ValueError(f"the capacity holds no whole block of {self.block_size} tokens")
        return blocks


def analyze(
    requests: Sequence[PromptRequest],
    model: ModelInfo,
    config: AdvisorConfig,
    *,
    log: LoadedLog | None = None,
    progress: bool = False,
) -> AdviceReport:
    """Everything the report shows, for ``requests`` replayed in order on ``model``'s tokens."""
    block_size = config.block_size
    kv_per_token = model.kv_bytes_per_token
    capacity = config.capacity_blocks(kv_per_token)
    base = ReplayConfig(
        block_size=block_size,
        capacity_blocks=capacity,
        ttl=config.ttl if _has_timestamps(requests) else None,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=model.max_model_len,
    )
    bar = _progress_bar(progress, len(requests))
    host_blocks, store_blocks = config.tier_blocks(kv_per_token)
    # The tiers change nothing on the device (a loaded block enters the pool as a recomputed one
    # would), so this one replay is also the device-only prediction.
    main = replay(requests, dataclasses.replace(base, host_blocks=host_blocks, store_blocks=store_blocks), progress=bar)
    # The same log without the capacity limit (churn) and without the TTL (expiry).
    no_cap = main if capacity is None else replay(requests, dataclasses.replace(base, capacity_blocks=None))
    no_ttl = main if base.ttl is None else replay(requests, dataclasses.replace(base, ttl=None))

    curve_bar = _curve_bar(progress, config.curve_points)
    curve = capacity_curve(
        requests, base, unbounded=no_cap, known={capacity: main} if capacity is not None else None,
        num_points=config.curve_points, target=config.curve_target,
        on_replay=curve_bar.update if curve_bar is not None else None,
    )
    if curve_bar is not None:
        curve_bar.close()

    tokenizer = model.tokenizer
    findings: list[Finding] = []
    pairs = find_divergences(requests, config.min_shared_tokens)
    reordered: ReplayResult | None = None
    if pairs:
        findings += divergence_findings(requests, pairs, tokenizer, block_size)
        rewritten = [dataclasses.replace(r, token_ids=ids) for r, ids in zip(requests, reorder_for_caching(requests, pairs))]
        reordered = replay(rewritten, base)
        for f in findings:
            f.data["hit_rate_after_fix"] = reordered.hit_rate
    in_groups = {p.request for p in pairs} | {p.partner for p in pairs}
    overlaps = prefix_overlaps(requests)
    findings += prefix_findings(
        requests, overlaps, block_size=block_size, min_prefix_tokens=config.min_prefix_tokens,
        head_tokens=template_head_tokens(tokenizer), exclude=in_groups, tokenizer=tokenizer,
    )
    min_loss = max(block_size, int(_MIN_LOSS_FRACTION * main.query_tokens))
    churn = no_cap.hit_tokens - main.hit_tokens
    if capacity is not None and churn >= min_loss:
        below_knee = main.hit_rate < curve.target * curve.max_hit_rate
        findings.append(_churn_finding(main, no_cap, curve, kv_per_token, block_size, below_knee))
    expired = no_ttl.hit_tokens - main.hit_tokens
    if base.ttl is not None and expired >= min_loss:
        findings.append(_ttl_finding(main, no_ttl, base.ttl, requests))
    tiers = None
    if host_blocks or store_blocks:
        tiers = predict_tiers(main, [r.num_tokens for r in requests], kv_bytes_per_token=kv_per_token,
                              prefill_tokens_per_s=config.prefill_tokens_per_s, host_gbps=config.host_gbps,
                              store_gbps=config.store_gbps)
        findings += tier_findings(tiers, main, kv_per_token, min_tokens=min_loss)
    findings.sort(key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), -f.tokens_lost))

    roots = build_prefix_tree(requests)
    top = top_shared_prefixes(roots, requests, tokenizer, config.top_prefixes)
    savings = _savings(main, requests, config)
    notes = []
    if config.ttl is not None and base.ttl is None:
        notes.append("the log has no timestamps, so the TTL was not applied")
    if main.rejected:
        notes.append(f"{len(main.rejected)} requests do not fit the model's context or the cache and were not replayed")
    return AdviceReport(
        log=log,
        num_requests=len(requests),
        model=model,
        config=config,
        capacity_blocks=capacity,
        ttl_applied=base.ttl,
        result=main,
        unbounded=no_cap,
        curve=curve,
        savings=savings,
        findings=findings,
        top_prefixes=top,
        prefix_roots=roots,
        reordered=reordered,
        divergence_pairs=pairs,
        requests=list(requests),
        notes=notes,
        tiers=tiers,
    )


def _has_timestamps(requests: Sequence[PromptRequest]) -> bool:
    return bool(requests) and all(r.timestamp is not None for r in requests)


def _savings(result: ReplayResult, requests: Sequence[PromptRequest], config: AdvisorConfig) -> Savings:
    rate = config.prefill_tokens_per_s
    ttft_total = result.hit_tokens / rate if rate else None
    prefill_total = result.query_tokens / rate if rate else None
    price = config.price_per_mtok
    cost_full = result.query_tokens * price / 1e6 if price is not None else None
    cost_saved = result.hit_tokens * price * config.cached_discount / 1e6 if price is not None else None
    return Savings(
        prefill_tokens_saved=result.hit_tokens,
        prefill_tokens_computed=result.query_tokens - result.hit_tokens,
        prefill_tokens_per_s=rate,
        prefill_rate_source=config.prefill_rate_source if rate else None,
        ttft_saved_s_total=ttft_total,
        ttft_saved_s_mean=ttft_total / result.num_requests if ttft_total is not None and result.num_requests else None,
        ttft_saved_fraction=ttft_total / prefill_total if ttft_total is not None and prefill_total else None,
        cached_discount=config.cached_discount,
        cost_saved_fraction=result.hit_rate * config.cached_discount,
        price_per_mtok=price,
        input_cost_without_cache=cost_full,
        input_cost_saved=cost_saved,
    )


def _churn_finding(
    main: ReplayResult, no_cap: ReplayResult, curve: CapacityCurve, kv_per_token: int, block_size: int, below_knee: bool
) -> Finding:
    """Hits lost to evictions. Below the knee of the curve it is the working set not fitting
    (high); past it, the tail of rarely reused prefixes that only a much larger cache keeps (info)."""
    lost = no_cap.hit_tokens - main.hit_tokens
    capacity_tokens = main.num_blocks * block_size
    knee = curve.knee_tokens or capacity_tokens
    everything = curve.points[-1].capacity_tokens if curve.points else capacity_tokens
    detail = (
        f"At {capacity_tokens:,} tokens ({human_bytes(capacity_tokens * kv_per_token)}) the hit rate is "
        f"{main.hit_rate:.1%}; with room for everything it would be {no_cap.hit_rate:.1%}. "
        f"{main.evicted_blocks:,} blocks were evicted to make room, and prefixes still in use went with them."
    )
    if below_knee:
        title = f"The working set exceeds the cache: {lost:,} prompt tokens re-prefilled after eviction"
        fix = (
            f"Give the cache at least ~{knee:,} tokens of KV ({human_bytes(knee * kv_per_token)} for this model): the hit "
            f"rate reaches {curve.target:.0%} of its maximum there (see the capacity curve). Otherwise keep fewer long "
            f"prefixes alive at once: route requests with the same prefix to the same replica, or merge near-identical "
            f"prompts."
        )
        suggested = knee
    else:
        title = f"Past the saturation point, evictions still cost {lost:,} prompt tokens"
        fix = (
            f"The cache is past the knee of the curve ({knee:,} tokens); keeping every prefix takes "
            f"~{everything:,} tokens ({human_bytes(everything * kv_per_token)}), worth it only if those rarely reused "
            f"prefixes are long."
        )
        suggested = everything
    return Finding(
        kind="churn",
        severity="high" if below_knee else "info",
        title=title,
        detail=detail,
        fix=fix,
        requests=sum(1 for a, b in zip(main.cached_tokens, no_cap.cached_tokens) if b > a),
        tokens_lost=lost,
        data={
            "capacity_tokens": capacity_tokens,
            "hit_rate": main.hit_rate,
            "hit_rate_unbounded": no_cap.hit_rate,
            "evicted_blocks": main.evicted_blocks,
            "below_saturation": below_knee,
            "suggested_capacity_tokens": suggested,
            "suggested_capacity_bytes": suggested * kv_per_token,
        },
    )


def _ttl_finding(main: ReplayResult, no_ttl: ReplayResult, ttl: float, requests: Sequence[PromptRequest]) -> Finding:
    lost = no_ttl.hit_tokens - main.hit_tokens
    affected = [i for i, (a, b) in enumerate(zip(main.cached_tokens, no_ttl.cached_tokens)) if b > a]
    gaps = [
        requests[i].timestamp - requests[i - 1].timestamp  # type: ignore[operator]
        for i in range(1, len(requests))
    ]
    median_gap = statistics.median(gaps) if gaps else 0.0
    return Finding(
        kind="ttl_expiry",
        severity="medium",
        title=f"{lost:,} prompt tokens missed because their prefix sat unused for more than {ttl:g} s",
        detail=(
            f"{len(affected)} requests came back to a prefix after it had expired; hit rate {main.hit_rate:.1%} "
            f"with the TTL, {no_ttl.hit_rate:.1%} without. Median gap between requests: {median_gap:.1f} s."
        ),
        fix=(
            "Use a longer cache TTL (e.g. the 1h tier), or keep hot prefixes warm with a request more often than "
            f"every {ttl:g} s when the saved prefill is worth more than the keep-alive calls."
        ),
        requests=len(affected),
        tokens_lost=lost,
        data={"ttl_s": ttl, "hit_rate": main.hit_rate, "hit_rate_without_ttl": no_ttl.hit_rate},
    )


def _progress_bar(enabled: bool, total: int):
    if not enabled or total < 200:
        return None
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, total=total, desc="replaying", unit="req", leave=False)


class _CurveBar:
    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="capacity curve", unit="replay", leave=False)

    def update(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _curve_bar(enabled: bool, points: int) -> _CurveBar | None:
    return _CurveBar(points + 6) if enabled else None

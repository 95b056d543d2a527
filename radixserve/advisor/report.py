"""AdviceReport: the advisor's result, as a terminal report and as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixserve.advisor.analyze import AdvisorConfig
    from radixserve.advisor.curve import CapacityCurve
    from radixserve.advisor.findings import DivergencePair, Finding
    from radixserve.advisor.logs import LoadedLog, PromptRequest
    from radixserve.advisor.model_info import ModelInfo
    from radixserve.advisor.prefix_tree import PrefixNode, SharedPrefix
    from radixserve.advisor.replay import ReplayResult
    from radixserve.advisor.tier_costs import TierPrediction

JSON_SCHEMA_VERSION = 1


@dataclass(slots=True)
class Savings:
    """What the predicted hits are worth."""

    prefill_tokens_saved: int
    prefill_tokens_computed: int
    prefill_tokens_per_s: float | None
    prefill_rate_source: str | None  # "measured" | "given" | None
    ttft_saved_s_total: float | None
    ttft_saved_s_mean: float | None
    ttft_saved_fraction: float | None  # of the prefill time without any cache
    cached_discount: float
    cost_saved_fraction: float  # of the input-token cost
    price_per_mtok: float | None
    input_cost_without_cache: float | None
    input_cost_saved: float | None


@dataclass(slots=True)
class AdviceReport:
    """Everything ``radixserve advise`` found about one log."""

    log: LoadedLog | None
    num_requests: int
    model: ModelInfo
    config: AdvisorConfig
    capacity_blocks: int | None  # None: unbounded
    ttl_applied: float | None
    result: ReplayResult
    unbounded: ReplayResult
    curve: CapacityCurve
    savings: Savings
    findings: list[Finding]
    top_prefixes: list[SharedPrefix]
    prefix_roots: list[PrefixNode]
    reordered: ReplayResult | None  # the log replayed after the suggested reordering
    divergence_pairs: list[DivergencePair]
    requests: list[PromptRequest]
    notes: list[str] = field(default_factory=list)
    tiers: TierPrediction | None = None  # --host-gb / --store-gb

    @property
    def hit_rate(self) -> float:
        return self.result.hit_rate

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (schema_version 1; fields are only ever added)."""
        block_size = self.config.block_size
        kv = self.model.kv_bytes_per_token
        r = self.result
        log = self.log
        timestamps = [q.timestamp for q in self.requests if q.timestamp is not None]
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "log": {
                "path": log.path if log else None,
                "requests": self.num_requests,
                "skipped_lines": [{"line": s.line, "reason": s.reason} for s in log.skipped] if log else [],
                "apis": dict(log.api_counts) if log else {},
                "rendered_from_text_only": dict(log.lenient) if log else {},
                "namespaces": len({q.namespace for q in self.requests}),
                "has_timestamps": len(timestamps) == len(self.requests) and bool(timestamps),
                "span_s": (max(timestamps) - min(timestamps)) if timestamps else None,
                "prompt_tokens": {
                    "total": sum(q.num_tokens for q in self.requests),
                    "mean": sum(q.num_tokens for q in self.requests) / max(1, len(self.requests)),
                    "max": max((q.num_tokens for q in self.requests), default=0),
                },
            },
            "model": {
                "id": self.model.model_id,
                "kv_bytes_per_token": kv,
                "kv_bytes_per_block": kv * block_size,
                "kv_formula": self.model.kv_formula(),
                "max_model_len": self.model.max_model_len,
            },
            "cache": {
                "block_size": block_size,
                "capacity_blocks": self.capacity_blocks,
                "capacity_tokens": self.capacity_blocks * block_size if self.capacity_blocks else None,
                "capacity_bytes": self.capacity_blocks * block_size * kv if self.capacity_blocks else None,
                "eviction": "lru",
                "ttl_s": self.ttl_applied,
                "max_num_batched_tokens": self.config.max_num_batched_tokens,
            },
            "prediction": {
                "hit_rate": r.hit_rate,
                "query_tokens": r.query_tokens,
                "hit_tokens": r.hit_tokens,
                "requests_replayed": r.num_requests,
                "requests_with_hit": r.hits,
                "request_hit_rate": r.request_hit_rate,
                "requests_rejected": len(r.rejected),
                "evicted_blocks": r.evicted_blocks,
                "expired_blocks": r.expired_blocks,
                "peak_cached_tokens": r.peak_cached_blocks * block_size,
                "peak_cached_bytes": r.peak_cached_blocks * block_size * kv,
                "hit_rate_unbounded": self.unbounded.hit_rate,
                "hit_rate_after_fixes": self.reordered.hit_rate if self.reordered else None,
                "per_request_cached_tokens": r.cached_tokens,
            },
            "savings": {
                "prefill_tokens_saved": self.savings.prefill_tokens_saved,
                "prefill_tokens_computed": self.savings.prefill_tokens_computed,
                "prefill_tokens_per_s": self.savings.prefill_tokens_per_s,
                "prefill_rate_source": self.savings.prefill_rate_source,
                "ttft_saved_s_total": self.savings.ttft_saved_s_total,
                "ttft_saved_s_mean": self.savings.ttft_saved_s_mean,
                "ttft_saved_fraction": self.savings.ttft_saved_fraction,
                "cached_discount": self.savings.cached_discount,
                "cost_saved_fraction": self.savings.cost_saved_fraction,
                "price_per_mtok": self.savings.price_per_mtok,
                "input_cost_without_cache": self.savings.input_cost_without_cache,
                "input_cost_saved": self.savings.input_cost_saved,
            },
            "capacity_curve": {
                "target_fraction": self.curve.target,
                "max_hit_rate": self.curve.max_hit_rate,
                "knee_tokens": self.curve.knee_tokens,
                "knee_bytes": self.curve.knee_tokens * kv if self.curve.knee_tokens is not None else None,
                "points": [
                    {"capacity_tokens": p.capacity_tokens, "capacity_bytes": p.capacity_tokens * kv, "hit_rate": p.hit_rate,
                     "hit_tokens": p.hit_tokens}
                    for p in self.curve.points
                ],
            },
            "top_prefixes": [
                {
                    "requests": p.requests,
                    "tokens": p.tokens,
                    "kv_bytes": p.tokens * kv,
                    "branches": p.branches,
                    "start_text": p.start_text,
                    "end_text": p.end_text,
                    "branch_texts": p.branch_texts,
                    "namespace": p.namespace,
                }
                for p in self.top_prefixes
            ],
            "observed_cache_reasons": {
                reason: {"requests": n, "missed_tokens": log.cache_reason_missed_tokens[reason]}
                for reason, n in log.cache_reasons.most_common()
            } if log else {},
            "findings": [f.to_json() for f in self.findings],
            "notes": list(self.notes),
            "tiers": self._tiers_json() if self.tiers is not None else None,
        }

    def _tiers_json(self) -> dict[str, Any]:
        r = self.result
        block_bytes = self.model.kv_bytes_per_token * self.config.block_size
        return {
            **self.tiers.to_json(),
            "host_bytes": self.tiers.host_blocks * block_bytes,
            "store_bytes": self.tiers.store_blocks * block_bytes,
            "host_hit_tokens": r.host_hit_tokens,
            "store_hit_tokens": r.store_hit_tokens,
            "demoted_to_host_blocks": r.demoted_to_host_blocks,
            "demoted_to_store_blocks": r.demoted_to_store_blocks,
            "dropped_from_host_blocks": r.dropped_from_host_blocks,
            "dropped_from_store_blocks": r.dropped_from_store_blocks,
            "per_request_host_tokens": r.host_tokens,
            "per_request_store_tokens": r.store_tokens,
        }

    # ---- terminal -----------------------------------------------------------------------
    def render_text(self, width: int = 100) -> str:
        """The human-readable report."""
        block_size = self.config.block_size
        kv = self.model.kv_bytes_per_token
        r = self.result
        s = self.savings
        out: list[str] = []
        add = out.append
        title = f"radixserve prompt-cache advisor — {self.log.path if self.log else 'requests'}"
        add(title)
        add("=" * min(width, len(title)))
        apis = ", ".join(f"{k} {v:,}" for k, v in sorted(self.log.api_counts.items())) if self.log else ""
        namespaces = len({q.namespace for q in self.requests})
        line = f"{self.num_requests:,} requests" + (f" ({apis})" if apis else "")
        line += f", {namespaces} namespace{'s' if namespaces != 1 else ''}"
        if self.log and self.log.skipped:
            first = self.log.skipped[0]
            line += f", {len(self.log.skipped)} lines skipped (first: line {first.line}: {first.reason})"
        add(line)
        if self.log and self.log.lenient:
            what = ", ".join(f"{k} x{v}" for k, v in self.log.lenient.most_common(4))
            add(f"  rendered from their text parts only (the server would refuse them as sent: {what})")
        tokens = [q.num_tokens for q in self.requests]
        mean = sum(tokens) / max(1, len(tokens))
        add(f"prompt tokens: {sum(tokens):,} in all, {mean:,.0f} mean, {max(tokens, default=0):,} max")
        f = self.model.kv_formula()
        add(
            f"model {self.model.model_id}: KV = 2 x {f['layers']} layers x {f['kv_heads']} kv heads x {f['head_dim']} "
            f"head dim x {f['dtype_bytes']} B ({f['dtype']}) = {kv:,} B/token, {human_bytes(kv * block_size)} per {block_size}-token block"
        )
        if self.capacity_blocks:
            cap = f"{self.capacity_blocks * block_size:,} tokens ({human_bytes(self.capacity_blocks * block_size * kv)})"
        else:
            cap = "unlimited (never evicts)"
        ttl = f"TTL {self.ttl_applied:g} s" if self.ttl_applied else "no TTL"
        add(f"cache: {block_size}-token blocks, capacity {cap}, LRU eviction, {ttl}")
        add("")

        add("Prediction")
        rows = [
            ("hit rate (prompt tokens from cache)", f"{r.hit_rate:6.1%}  ({r.hit_tokens:,} of {r.query_tokens:,} tokens)"),
            ("requests with a hit", f"{r.hits:,} of {r.num_requests:,} ({r.request_hit_rate:.1%})"),
            ("prefill tokens saved", f"{s.prefill_tokens_saved:,} (computed: {s.prefill_tokens_computed:,})"),
        ]
        if s.ttft_saved_s_total is not None:
            rows.append((
                "est. TTFT saved",
                f"{_seconds(s.ttft_saved_s_mean or 0.0)} per request on average, {_seconds(s.ttft_saved_s_total)} in all "
                f"({s.ttft_saved_fraction or 0.0:.1%} of prefill time) at {s.prefill_tokens_per_s:,.0f} tok/s "
                f"({s.prefill_rate_source})",
            ))
        else:
            rows.append(("est. TTFT saved", "unknown: give --prefill-tokens-per-s (or let the advisor measure it)"))
        cost = f"{s.cost_saved_fraction:.1%} at a {s.cached_discount:.0%} cached-token discount"
        if s.input_cost_saved is not None and s.input_cost_without_cache is not None:
            cost += f" (${s.input_cost_saved:,.4g} of ${s.input_cost_without_cache:,.4g} at ${s.price_per_mtok:g}/Mtok)"
        rows.append(("input-token cost saved", cost))
        if self.capacity_blocks:
            rows.append(("with unlimited capacity", f"{self.unbounded.hit_rate:6.1%}"))
        rows.append((
            "cache use",
            f"peak {r.peak_cached_blocks * block_size:,} tokens ({human_bytes(r.peak_cached_blocks * block_size * kv)}), "
            f"{r.evicted_blocks:,} blocks evicted" + (f", {r.expired_blocks:,} expired" if self.ttl_applied else ""),
        ))
        if r.rejected:
            rows.append(("not replayed", f"{len(r.rejected)} requests too long for the model or the cache"))
        label_w = max(len(k) for k, _ in rows)
        for k, v in rows:
            add(f"  {k:<{label_w}}  {v}")
        add("")

        if self.tiers is not None:
            self._render_tiers(add)
        add(f"Capacity curve (hit rate by cache size; saturation = {self.curve.target:.0%} of the maximum)")
        max_rate = max((p.hit_rate for p in self.curve.points), default=0.0) or 1.0
        for p in self.curve.points:
            if p.refined and p.capacity_tokens != self.curve.knee_tokens:
                continue  # bisection steps: in the JSON, not worth a row here
            bar = "█" * round(30 * p.hit_rate / max_rate)
            marks = []
            if self.curve.knee_tokens == p.capacity_tokens:
                marks.append("<- saturates")
            if self.capacity_blocks and p.capacity_tokens == self.capacity_blocks * block_size:
                marks.append("<- configured")
            add(
                f"  {p.capacity_tokens:>12,} tokens {human_bytes(p.capacity_tokens * kv):>10}  {p.hit_rate:6.1%} "
                f"{bar:<30} {' '.join(marks)}"
            )
        if self.curve.knee_tokens is not None:
            add(
                f"  -> {self.curve.knee_tokens:,} tokens ({human_bytes(self.curve.knee_tokens * kv)} of KV) reach "
                f"{self.curve.target:.0%} of the maximum hit rate {self.curve.max_hit_rate:.1%}; more memory adds little."
            )
        else:
            add("  -> no capacity helps: nothing in this log is reused")
        add("")

        add("Biggest shared prefixes")
        if not self.top_prefixes:
            add("  none: no two requests share a prefix")
        for i, p in enumerate(self.top_prefixes, start=1):
            where = f" in namespace {p.namespace!r}" if namespaces > 1 else ""
            add(
                f"  {i}. {p.requests:,} requests{where} share {p.tokens:,} tokens ({human_bytes(p.tokens * kv)} of KV), "
                f"then branch {p.branches:,} ways"
            )
            add(f"     starts \"{p.start_text}\"  ...  ends \"{p.end_text}\"")
            if p.branch_texts:
                add("     branches: " + " | ".join(p.branch_texts))
        add("")

        if self.log and self.log.cache_reasons:
            add("Why requests missed (the server's cache reports)")
            total = sum(self.log.cache_reasons.values())
            for reason, n in self.log.cache_reasons.most_common():
                missed = self.log.cache_reason_missed_tokens[reason]
                add(f"  {reason:<26} {n:>7,} requests ({n / total:6.1%}), {missed:>12,} prompt tokens not read from cache")
            add("")

        add("Findings")
        if not self.findings:
            add("  none: this log is cache-friendly as it is")
        for finding in self.findings:
            add(f"  [{finding.severity.upper()}] {finding.title}")
            for text in (finding.detail, "Fix: " + finding.fix):
                for chunk in _wrap(text, width - 6):
                    add(f"      {chunk}")
            after = finding.data.get("hit_rate_after_fix")
            if after is not None:
                add(f"      Predicted hit rate after the fix: {r.hit_rate:.1%} -> {after:.1%}")
            if finding.data.get("more_groups"):
                more, more_lost = finding.data["more_groups"], finding.data["more_tokens_lost"]
                add(f"      (+ {more} smaller groups like it, {more_lost:,} tokens)")
        for note in self.notes:
            add(f"  note: {note}")
        return "\n".join(out) + "\n"


    def _render_tiers(self, add) -> None:
        t, r = self.tiers, self.result
        block_bytes = self.model.kv_bytes_per_token * self.config.block_size

        def pays(value: bool | None) -> str:
            return "" if value is None else ("  loads beat recomputing" if value else "  slower than recomputing")

        add("Tiers (prompt tokens found in each; a lower tier is asked past the device's match)")
        add(f"  device pool                          {t.device_hit_rate:6.1%}  ({r.hit_tokens:,} tokens)")
        if t.host_blocks:
            add(f"  host RAM {human_bytes(t.host_blocks * block_bytes):>10} at {t.host_gbps:>5g} GB/s   "
                f"{t.host_hit_rate:6.1%}  ({r.host_hit_tokens:,} tokens){pays(t.host_pays)}")
        if t.store_blocks:
            add(f"  storage  {human_bytes(t.store_blocks * block_bytes):>10} at {t.store_gbps:>5g} GB/s   "
                f"{t.store_hit_rate:6.1%}  ({r.store_hit_tokens:,} tokens){pays(t.store_pays)}")
        if t.ttft_mean_s_device_only is not None and t.ttft_mean_s_with_tiers is not None:
            add(f"  est. prompt TTFT: mean {_seconds(t.ttft_mean_s_device_only)} -> {_seconds(t.ttft_mean_s_with_tiers)}, "
                f"p50 {_seconds(t.ttft_p50_s_device_only or 0.0)} -> {_seconds(t.ttft_p50_s_with_tiers or 0.0)} "
                f"(device pool only -> with the tiers); break-even bandwidth {t.break_even_gbps:.2f} GB/s")
        else:
            add("  est. prompt TTFT: unknown (give --prefill-tokens-per-s)")
        add("")


def human_bytes(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _seconds(value: float) -> str:
    if value >= 120:
        return f"{value / 60:.1f} min"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.0f} ms"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=max(40, width), break_long_words=False, break_on_hyphens=False) or [""]

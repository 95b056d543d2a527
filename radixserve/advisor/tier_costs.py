"""What the host and storage tiers are worth: per-tier hit rates and a TTFT estimate.

The prompt part of a request's time to first token is modelled as

    TTFT = computed tokens / prefill rate
         + sum over tiers: tokens loaded from it x KV bytes per token / its bandwidth

A device hit costs nothing (its KV is already in the pool). A tier whose load time per token is
not below the recompute time per token (KV bytes per token / bandwidth >= 1 / prefill rate) would
not be read by the engine's cost model: its hits are recomputed, and the finding says so. The
break-even bandwidth is KV bytes per token x prefill rate: a tier slower than that never pays.

Defaults (overridable: --host-gbps, --store-gbps): host 20 GB/s, a pinned-memory copy over PCIe
4.0 x16 (about 25 GB/s peak; PCIe 5.0 / H200 hosts reach 40-50); storage 2 GB/s, one local
NVMe SSD read path with its checksum (radixserve verifies sha256 on every load). GB = 10^9 bytes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from radixserve.advisor.findings import Finding
from radixserve.advisor.replay import ReplayResult

DEFAULT_HOST_GBPS = 20.0
DEFAULT_STORE_GBPS = 2.0


@dataclass(slots=True)
class TierPrediction:
    """The tiers' share of the prompt tokens and the TTFT with and without them."""

    host_blocks: int
    store_blocks: int
    host_gbps: float
    store_gbps: float
    device_hit_rate: float
    host_hit_rate: float
    store_hit_rate: float
    host_pays: bool | None  # None: no prefill rate to compare with
    store_pays: bool | None
    break_even_gbps: float | None  # a tier slower than this never beats recomputing
    # prompt-prefill part of TTFT per request, seconds (None without a prefill rate)
    ttft_mean_s_device_only: float | None
    ttft_mean_s_with_tiers: float | None
    ttft_p50_s_device_only: float | None
    ttft_p50_s_with_tiers: float | None

    @property
    def ttft_speedup(self) -> float | None:
        """Mean TTFT without the tiers / with them (> 1: the tiers help)."""
        if not self.ttft_mean_s_with_tiers or self.ttft_mean_s_device_only is None:
            return None
        return self.ttft_mean_s_device_only / self.ttft_mean_s_with_tiers

    def to_json(self) -> dict:
        return {
            "host_blocks": self.host_blocks, "store_blocks": self.store_blocks,
            "host_gbps": self.host_gbps, "store_gbps": self.store_gbps,
            "device_hit_rate": self.device_hit_rate, "host_hit_rate": self.host_hit_rate,
            "store_hit_rate": self.store_hit_rate, "host_pays": self.host_pays, "store_pays": self.store_pays,
            "break_even_gbps": self.break_even_gbps,
            "ttft_mean_s_device_only": self.ttft_mean_s_device_only,
            "ttft_mean_s_with_tiers": self.ttft_mean_s_with_tiers,
            "ttft_p50_s_device_only": self.ttft_p50_s_device_only, "ttft_p50_s_with_tiers": self.ttft_p50_s_with_tiers,
            "ttft_speedup": self.ttft_speedup,
        }


def predict_tiers(
    result: ReplayResult, prompt_tokens: list[int], *, kv_bytes_per_token: int,
    prefill_tokens_per_s: float | None, host_gbps: float, store_gbps: float,
) -> TierPrediction:
    """Per-tier hit rates of a replay with tiers, and the TTFT model above. `prompt_tokens` are
    the requests' lengths, in the replay's order (rejected requests are left out)."""
    config = result.config
    rate = prefill_tokens_per_s
    host_pays = store_pays = None
    device_only: list[float] = []
    with_tiers: list[float] = []
    break_even = None
    if rate:
        recompute = 1.0 / rate
        host_load = kv_bytes_per_token / (host_gbps * 1e9)
        store_load = kv_bytes_per_token / (store_gbps * 1e9)
        host_pays, store_pays = host_load < recompute, store_load < recompute
        break_even = kv_bytes_per_token * rate / 1e9
        rejected = set(result.rejected)
        for i, n in enumerate(prompt_tokens):
            if i in rejected:
                continue
            missed = n - result.cached_tokens[i]
            host, store = result.host_tokens[i], result.store_tokens[i]
            device_only.append(missed * recompute)
            with_tiers.append(
                (missed - host - store) * recompute
                + host * (host_load if host_pays else recompute)
                + store * (store_load if store_pays else recompute)
            )
    return TierPrediction(
        host_blocks=config.host_blocks, store_blocks=config.store_blocks, host_gbps=host_gbps, store_gbps=store_gbps,
        device_hit_rate=result.hit_rate, host_hit_rate=result.host_hit_rate, store_hit_rate=result.store_hit_rate,
        host_pays=host_pays, store_pays=store_pays, break_even_gbps=break_even,
        ttft_mean_s_device_only=statistics.fmean(device_only) if device_only else None,
        ttft_mean_s_with_tiers=statistics.fmean(with_tiers) if with_tiers else None,
        ttft_p50_s_device_only=statistics.median(device_only) if device_only else None,
        ttft_p50_s_with_tiers=statistics.median(with_tiers) if with_tiers else None,
    )


def tier_findings(prediction: TierPrediction, result: ReplayResult, kv_bytes_per_token: int,
                  min_tokens: int) -> list[Finding]:
    """When a configured tier would pay, when it would not (too slow), and when it would idle."""
    from radixserve.advisor.report import human_bytes

    p = prediction
    findings = []
    block_bytes = kv_bytes_per_token * result.config.block_size
    tiers = (
        ("host", "host-RAM tier", p.host_blocks, p.host_gbps, result.host_hit_tokens, p.host_pays,
         "--host-cache-gb {gb:g} (GPU only: on a CPU the device pool already is RAM)"),
        ("storage", "storage tier", p.store_blocks, p.store_gbps, result.store_hit_tokens, p.store_pays,
         "--kv-store disk:PATH --kv-store-gb {gb:g}"),
    )
    for name, label, blocks, gbps, tokens, pays, flag in tiers:
        if blocks <= 0:
            continue
        gb = blocks * block_bytes / 2**30
        size = human_bytes(blocks * block_bytes)
        share = tokens / result.query_tokens if result.query_tokens else 0.0
        data = {"tier": name, "capacity_blocks": blocks, "capacity_bytes": blocks * block_bytes, "gbps": gbps,
                "hit_tokens": tokens, "hit_rate": share, "pays": pays, "break_even_gbps": p.break_even_gbps}
        requests = sum(1 for h in (result.host_tokens if name == "host" else result.store_tokens) if h > 0)
        if tokens < min_tokens:
            findings.append(Finding(
                kind=f"tier_{name}_idle", severity="info",
                title=f"A {size} {label} would rarely be read: {tokens:,} prompt tokens ({share:.1%})",
                detail=(f"The device pool evicted {result.evicted_blocks:,} blocks; almost none of them were asked "
                        f"for again while the {label} still held them."),
                fix="Leave it off for this traffic (or size the device pool instead: see the capacity curve).",
                requests=requests, tokens_lost=0, data=data,
            ))
        elif pays is None:
            findings.append(Finding(
                kind=f"tier_{name}", severity="info",
                title=f"A {size} {label} would serve {share:.1%} of prompt tokens ({tokens:,})",
                detail="Whether loading them beats recomputing depends on the prefill rate, which is unknown.",
                fix="Give --prefill-tokens-per-s (or let the advisor measure it) to price the tier.",
                requests=requests, tokens_lost=tokens, data=data,
            ))
        elif pays:
            speedup = f"mean prompt TTFT {_ms(p.ttft_mean_s_device_only)} -> {_ms(p.ttft_mean_s_with_tiers)} with " \
                      f"the tiers configured"
            findings.append(Finding(
                kind=f"tier_{name}", severity="medium",
                title=f"A {size} {label} would serve {share:.1%} of prompt tokens the device pool lost ({tokens:,})",
                detail=(f"Loading a token's KV ({kv_bytes_per_token:,} B) at {gbps:g} GB/s takes "
                        f"{_us(kv_bytes_per_token / (gbps * 1e9))}, recomputing it "
                        f"{_us(kv_bytes_per_token / (p.break_even_gbps * 1e9))}: loading wins; {speedup}."),
                fix=f"Run with {flag.format(gb=round(gb, 2))}.",
                requests=requests, tokens_lost=tokens, data=data,
            ))
        else:
            findings.append(Finding(
                kind=f"tier_{name}_too_slow", severity="info",
                title=f"The {label} at {gbps:g} GB/s is slower than recomputing: its {tokens:,} hits would be "
                      "recomputed",
                detail=(f"Loading a token's KV ({kv_bytes_per_token:,} B) takes "
                        f"{_us(kv_bytes_per_token / (gbps * 1e9))}, "
                        f"recomputing it {_us(kv_bytes_per_token / (p.break_even_gbps * 1e9))}; the engine's cost "
                        f"model would recompute, so the tier costs writes and saves nothing."),
                fix=f"A {label} pays above {p.break_even_gbps:.2f} GB/s for this model and prefill rate; "
                    "otherwise leave it off.",
                requests=requests, tokens_lost=0, data=data,
            ))
    return findings


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.2f} µs"

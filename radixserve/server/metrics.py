"""Prometheus metrics, in a registry owned by one app (no module-level metric objects).

Counters and gauges that the engine already keeps (LLMEngine.snapshot()) are not duplicated:
a custom collector reports a snapshot taken on the engine thread just before
each scrape. Latency histograms are observed here, on the event loop, as requests finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from radixserve.engine import EngineSnapshot, TierSnapshot
from radixserve.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


# (snapshot field, metric name, help); counters get Prometheus' "_total" suffix on exposition
_COUNTERS = (
    ("prefix_cache_queries", "radixserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    ("prefix_cache_hits", "radixserve_prefix_cache_hits", "Prompt tokens served from the prefix cache"),
    ("evicted_blocks", "radixserve_prefix_cache_evicted_blocks", "KV blocks evicted from the prefix cache"),
    ("inserted_blocks", "radixserve_prefix_cache_inserted_blocks", "KV blocks added to the prefix cache"),
    ("prompt_tokens", "radixserve_prompt_tokens", "Prompt tokens of admitted requests"),
    ("computed_prompt_tokens", "radixserve_computed_prompt_tokens", "Prompt tokens run through the model (not cached)"),
    ("generation_tokens", "radixserve_generation_tokens", "Tokens generated"),
    ("finished_requests", "radixserve_requests_finished", "Requests finished (aborted ones included)"),
    ("aborted_requests", "radixserve_requests_aborted", "Requests aborted (client gone, errors)"),
    ("preemptions", "radixserve_preemptions", "Running requests preempted for lack of KV blocks"),
)
_GAUGES = (
    ("prefix_cache_hit_rate", "radixserve_prefix_cache_hit_rate", "Cached / looked-up prompt tokens since start"),
    ("cached_blocks", "radixserve_prefix_cache_blocks", "KV blocks held by the prefix cache"),
    ("free_blocks", "radixserve_kv_free_blocks", "KV blocks on the free list"),
    ("total_blocks", "radixserve_kv_total_blocks", "KV blocks in the pool"),
    ("block_size", "radixserve_kv_block_size", "Tokens per KV block"),
    ("kv_cache_usage", "radixserve_kv_cache_usage_ratio", "Fraction of KV blocks in use (running requests + cache)"),
    ("running", "radixserve_num_requests_running", "Requests running"),
    ("waiting", "radixserve_num_requests_waiting", "Requests waiting to be scheduled"),
)


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: EngineSnapshot | None = None
        self.named_caches = 0

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        values = asdict(snap)
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=values[key])
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=values[key])
        yield GaugeMetricFamily("radixserve_named_caches", "Live named caches (/v1/caches)", value=self.named_caches)
        if snap.tiers is not None:
            yield from _tier_metrics(snap.tiers)
        yield from _tenant_families(snap.tenant_cache)


def _labelled(family, labels: dict[str, int]):
    for label, value in labels.items():
        family.add_metric([label], value)
    return family


def _tier_metrics(t: TierSnapshot) -> Iterator[Metric]:
    """The prefix cache's tiers (device / host / storage), each metric labelled by tier."""
    yield _labelled(CounterMetricFamily("radixserve_tier_hit_tokens", "Prompt tokens served from each cache tier",
                                        labels=["tier"]), t.hit_tokens)
    yield _labelled(CounterMetricFamily("radixserve_tier_hit_bytes", "KV bytes served from each cache tier",
                                        labels=["tier"]), t.hit_bytes)
    yield _labelled(GaugeMetricFamily("radixserve_tier_used_bytes", "KV bytes each cache tier holds",
                                      labels=["tier"]), t.used_bytes)
    yield _labelled(GaugeMetricFamily("radixserve_tier_capacity_bytes", "KV bytes each cache tier may hold "
                                      "(a Redis store: its maxmemory, 0 = unlimited)", labels=["tier"]), t.capacity_bytes)
    yield _labelled(GaugeMetricFamily("radixserve_tier_blocks", "KV blocks each cache tier holds",
                                      labels=["tier"]), t.records)
    yield _labelled(CounterMetricFamily("radixserve_tier_load_decisions", "Admissions that found a prefix below the "
                                        "device: loaded, or recomputed because loading was predicted slower",
                                        labels=["decision"]), t.decisions)
    yield CounterMetricFamily("radixserve_tier_corrupt_records", "Stored KV records refused (checksum, truncation, "
                              "wrong key or identity): each a miss, never loaded", value=t.corrupt_records)
    yield CounterMetricFamily("radixserve_tier_written_blocks", "KV blocks written to the storage tier",
                              value=t.written_blocks)
    yield CounterMetricFamily("radixserve_tier_write_failures", "KV blocks the storage tier could not take "
                              "(full disk, I/O error, writer queue full)", value=t.write_failures)
    yield CounterMetricFamily("radixserve_tier_prefetched_blocks", "Storage-tier KV blocks read in the background "
                              "while their request waited, not on the engine's step", value=t.prefetched_blocks)


# Per-tenant families. A tenant is an API key's id (auth.key_id, as in its namespace) under
# per-key isolation, "shared" for the one cache every key shares otherwise, "shared_scopes" for
# operator-published prefixes: bounded by the configured keys, never by cache_salts.
_TENANT_FAMILIES = (
    (CounterMetricFamily, "radixserve_tenant_prefix_cache_queries", "Prompt tokens this tenant looked up"),
    (CounterMetricFamily, "radixserve_tenant_prefix_cache_hits", "Prompt tokens this tenant read from the cache"),
    (GaugeMetricFamily, "radixserve_tenant_prefix_cache_blocks", "KV blocks the prefix cache holds for this tenant"),
    (CounterMetricFamily, "radixserve_tenant_prefix_cache_evicted_blocks",
     "This tenant's blocks evicted (LRU, its quota, a reset)"),
)


def tenant_label(tenant: str) -> str:
    return tenant.removeprefix("key:") if tenant else "shared"


def _tenant_families(tenants: dict[str, tuple[int, int, int, int]]) -> Iterator[Metric]:
    if not tenants:
        return
    for i, (kind, name, doc) in enumerate(_TENANT_FAMILIES):
        family = kind(name, doc, labels=["tenant"])
        for tenant, values in sorted(tenants.items()):
            family.add_metric([tenant_label(tenant)], values[i])
        yield family
    rate = GaugeMetricFamily("radixserve_tenant_prefix_cache_hit_rate", "Hit tokens / looked-up tokens of this tenant",
                             labels=["tenant"])
    for tenant, (queries, hits, _, _) in sorted(tenants.items()):
        rate.add_metric([tenant_label(tenant)], hits / queries if queries else 0.0)
    yield rate


class ServerMetrics:
    """The app's metrics. observe_finished() is the AsyncEngine's on_finished hook."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        self.time_to_first_token = Histogram(
            "radixserve_time_to_first_token_seconds", "Arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "radixserve_time_per_output_token_seconds", "Mean time between generated tokens, per request",
            buckets=_TPOT_BUCKETS, registry=self.registry,
        )
        self.tier_load_latency = Histogram(
            "radixserve_tier_load_seconds", "Time to read a prefix's blocks from a lower cache tier",
            labelnames=["tier"], buckets=_LOAD_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "radixserve_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_finished(self, out: RequestOutput) -> None:
        if out.finish_reason == "abort":
            return  # a truncated request would skew the latency distributions
        m = out.metrics
        if m.time_to_first_token is not None:
            self.time_to_first_token.observe(m.time_to_first_token)
        if m.e2e_latency is not None:
            self.e2e_latency.observe(m.e2e_latency)
        if len(out.token_ids) > 1 and m.first_token_time is not None and m.finish_time is not None:
            self.time_per_output_token.observe((m.finish_time - m.first_token_time) / (len(out.token_ids) - 1))

    def render(self, snapshot: EngineSnapshot, named_caches: int) -> bytes:
        """Prometheus text exposition with this snapshot of the engine."""
        self._engine.snapshot = snapshot
        if snapshot.tiers is not None:
            for tier, seconds in snapshot.tiers.load_seconds:
                self.tier_load_latency.labels(tier).observe(seconds)
        self._engine.named_caches = named_caches
        return generate_latest(self.registry)

"""/metrics counters move with traffic; /health; the admin prefix-cache reset."""

from __future__ import annotations

import uuid

import httpx

from tests.server.conftest import LONG_SYSTEM

NAMES = [
    "radixserve_prefix_cache_queries_total", "radixserve_prefix_cache_hits_total", "radixserve_prefix_cache_hit_rate",
    "radixserve_prefix_cache_blocks", "radixserve_prefix_cache_evicted_blocks_total", "radixserve_kv_cache_usage_ratio",
    "radixserve_kv_free_blocks", "radixserve_kv_total_blocks", "radixserve_num_requests_running",
    "radixserve_num_requests_waiting", "radixserve_time_to_first_token_seconds_count",
    "radixserve_time_per_output_token_seconds_count", "radixserve_e2e_request_latency_seconds_count",
    "radixserve_generation_tokens_total", "radixserve_named_caches",
]


def test_metrics_move(server):
    before = server.wait_idle()
    for name in NAMES:
        assert name in before, name
    client = server.openai()
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Any sights nearby?"}]
    salt = uuid.uuid4().hex
    for _ in range(2):
        r = client.chat.completions.create(model="embedded", messages=messages, max_tokens=3,
                                           extra_body={"cache_salt": salt, "ignore_eos": True})
    after = server.wait_idle()
    prompt = r.usage.prompt_tokens
    assert after["radixserve_prefix_cache_queries_total"] - before["radixserve_prefix_cache_queries_total"] == 2 * prompt
    # the engine's own count, as reported in usage
    hits = after["radixserve_prefix_cache_hits_total"] - before["radixserve_prefix_cache_hits_total"]
    assert hits == r.usage.prompt_tokens_details.cached_tokens > 0
    assert after["radixserve_prefix_cache_blocks"] > before["radixserve_prefix_cache_blocks"]
    assert after["radixserve_generation_tokens_total"] - before["radixserve_generation_tokens_total"] == 6
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"radixserve_{name}_count"] == before[f"radixserve_{name}_count"] + 2
    assert 0 < after["radixserve_kv_cache_usage_ratio"] <= 1
    assert 0 < after["radixserve_prefix_cache_hit_rate"] <= 1


def test_health(server):
    r = httpx.get(f"{server.base_url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_reset_prefix_cache(server):
    client = server.openai()
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Late checkout?"}]
    kw = dict(model="embedded", messages=messages, max_tokens=1, extra_body={"cache_salt": "reset-test"})
    client.chat.completions.create(**kw)
    assert client.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens > 0
    server.wait_idle()
    r = httpx.post(f"{server.base_url}/reset_prefix_cache")
    assert r.status_code == 200 and r.json()["freed_blocks"] > 0
    m = server.metrics()
    assert m["radixserve_prefix_cache_blocks"] == 0
    assert m["radixserve_kv_free_blocks"] == m["radixserve_kv_total_blocks"]
    assert client.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == 0

"""Shared prefixes and tenant quotas on a live server, through the official clients.

An operator publishes a system prompt; tenants A and B (per-key isolation) both read it from the
cache, neither reads the other's conversation after it; a tenant cannot publish. Tenant F floods
the cache: its quota holds (per-tenant /metrics), and A's conversation stays cached.
"""

from __future__ import annotations

import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from radixserve.server import ServerConfig
from radixserve.server.auth import key_id
from tests.server.custom_server import custom_server

ADMIN, KEY_A, KEY_B, KEY_F = "sk-ops", "sk-tenant-a", "sk-tenant-b", "sk-flood"
SYSTEM = ("You are the help desk of the Northwind library. Opening hours are 9 to 18 on weekdays, "
          "10 to 14 on Saturdays. Members borrow up to 12 books for three weeks. ") * 3
QUOTA = 16


def _tenant_metrics(base_url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).text
    return {(s.name, s.labels["tenant"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if "tenant" in s.labels}


@pytest.fixture(scope="module")
def server(embedded_model, tmp_path_factory):
    config = ServerConfig(api_keys=[KEY_A, KEY_B, KEY_F], admin_keys=[ADMIN], namespace_from_api_key=True)
    with custom_server(embedded_model, config, num_blocks=64, tenant_quota=QUOTA) as running:
        yield running


def _chat(client, question: str):
    return client.chat.completions.create(
        model="embedded", max_tokens=1, extra_body={"cache_report": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def test_both_tenants_read_the_published_prefix_and_neither_reads_the_others_rest(server):
    tenant = httpx.post(f"{server.base_url}/v1/shared_prefixes", json={"name": "library", "system": SYSTEM},
                        headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert tenant.status_code == 403  # publishing is an operator action
    published = httpx.post(f"{server.base_url}/v1/shared_prefixes", json={"name": "library", "system": SYSTEM},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    assert published.status_code == 200, published.text
    shared = published.json()["num_tokens"]
    assert shared > 0 and shared % 16 == 0

    a, b = server.openai(KEY_A), server.openai(KEY_B)
    question = "I lost my library card yesterday near the station; how do I get a new one, and does it cost anything?"
    first_a = _chat(a, question)
    assert first_a.usage.prompt_tokens_details.cached_tokens == shared  # the shared part, on A's first request
    assert first_a.usage.model_extra["cache_report"]["shared_tokens"] == shared
    again_a = _chat(a, question)
    assert again_a.usage.prompt_tokens_details.cached_tokens > shared  # A's own continuation
    first_b = _chat(b, question)  # the very same conversation, another tenant
    assert first_b.usage.prompt_tokens_details.cached_tokens == shared  # never A's suffix
    assert first_b.usage.model_extra["cache_report"]["reason"] == "not_cached"


def test_a_flood_stays_within_its_quota_and_others_keep_their_prefixes(server):
    a, f = server.openai(KEY_A), server.openai(KEY_F)
    question = "Which books can I borrow for longer than three weeks, and can I renew them online?"
    _chat(a, question)
    rng = random.Random(5)
    for _ in range(4):  # 4 x ~7 blocks of random text from F: twice its quota
        prompt = [rng.randrange(1000, 40000) for _ in range(110)]
        f.completions.create(model="embedded", prompt=prompt, max_tokens=1)
    metrics = _tenant_metrics(server.base_url)
    flood = key_id(KEY_F)
    assert metrics[("radixserve_tenant_prefix_cache_blocks", flood)] <= QUOTA
    assert metrics[("radixserve_tenant_prefix_cache_evicted_blocks_total", flood)] > 0
    assert metrics[("radixserve_tenant_prefix_cache_evicted_blocks_total", key_id(KEY_A))] == 0
    hit = _chat(a, question).usage.model_extra["cache_report"]
    assert hit["reason"] == "full_hit"
    assert metrics[("radixserve_tenant_prefix_cache_hit_rate", key_id(KEY_A))] > 0


def test_a_shared_prefix_file_is_published_at_startup(embedded_model, tmp_path):
    path = tmp_path / "help desk.txt"
    path.write_text(SYSTEM)
    config = ServerConfig(api_keys=[KEY_A], namespace_from_api_key=True, shared_prefix_files=[str(path)])
    with custom_server(embedded_model, config, num_blocks=64) as running:
        shared = running.engine.shared_prefix_cached_tokens("help-desk")  # named after the file
        assert shared > 0 and shared % 16 == 0
        usage = _chat(running.openai(KEY_A), "Where do I return books after hours?").usage
        assert usage.prompt_tokens_details.cached_tokens == shared == usage.model_extra["cache_report"]["shared_tokens"]

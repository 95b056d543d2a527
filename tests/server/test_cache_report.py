"""usage.cache_report through the official clients: a constructed miss of each kind, reasons exact.

Prompts are token ids (completions) or short chats, so every block boundary is known: the
embedded model's blocks are 16 tokens and a full hit always recomputes the last prompt token.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from radixserve.server import ServerConfig
from tests.server.custom_server import custom_server

KEY_A, KEY_B = "sk-report-a", "sk-report-b"
BS = 16


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def _report(client, prompt, **extra) -> dict:
    resp = client.completions.create(model="embedded", prompt=prompt, max_tokens=1,
                                     extra_body={"cache_report": True, **extra})
    return resp.usage.model_extra["cache_report"]


@pytest.fixture(scope="module")
def keyed(embedded_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    config = ServerConfig(api_keys=[KEY_A, KEY_B], namespace_from_api_key=True, request_log=str(log),
                          min_cacheable_tokens=16, cache_ttl_scale=0.002)
    with custom_server(embedded_model, config, num_blocks=12, max_pinned_fraction=1.0,
                 max_pinned_fraction_per_namespace=1.0) as server:
        server.log = log
        yield server


def test_each_reason_through_the_openai_client(keyed):
    a = keyed.openai(KEY_A)
    prompt = _ids(1, 3 * BS + 5)  # 3 full blocks cacheable
    first = _report(a, prompt)
    assert (first["reason"], first["cached_tokens"], first["cacheable_tokens"]) == ("not_cached", 0, 48)
    assert first["prompt_tokens"] == 53 and first["missed_tokens"] == 53
    hit = _report(a, prompt)
    assert (hit["reason"], hit["cached_tokens"]) == ("full_hit", 48)

    diverging = prompt[:BS + 6] + _ids(2, 2 * BS)
    diverged = _report(a, diverging)
    assert diverged["reason"] == "diverged" and diverged["cached_tokens"] == BS and diverged["diverged_at"] == BS + 6
    tok = keyed.engine.tokenizer
    assert diverged["context"] == {"before": tok.decode(diverging[BS + 2 : BS + 6], skip_special_tokens=False),
                                   "after": tok.decode(diverging[BS + 6 : BS + 10], skip_special_tokens=False)}

    salted = _report(a, prompt, cache_salt="s1")
    assert salted["reason"] == "different_namespace" and salted["cached_tokens"] == 0
    assert _report(keyed.openai(KEY_B), prompt)["reason"] == "not_cached"  # never names A's namespace

    assert _report(a, prompt, cache_policy="none")["reason"] == "opted_out"
    assert _report(a, _ids(3, 10))["reason"] == "prompt_shorter_than_block"

    _report(a, _ids(10, 11 * BS))  # 11 blocks through a 12-block pool: A's prompt is evicted
    evicted = _report(a, prompt)
    assert evicted["reason"] == "evicted" and evicted["cached_tokens"] == 0 and evicted["evicted_seconds_ago"] >= 0

    plain = a.completions.create(model="embedded", prompt=prompt, max_tokens=1)
    assert "cache_report" not in (plain.usage.model_extra or {})  # off unless asked


def test_ttl_expired_through_the_anthropic_client(keyed):
    client = keyed.anthropic(KEY_A)
    system = [{"type": "text", "text": "Remember the ledger entries: " + " ".join(f"item{i}" for i in range(30)),
               "cache_control": {"type": "ephemeral"}}]
    create = dict(model="embedded", max_tokens=1, system=system, messages=[{"role": "user", "content": "Hi"}],
                  extra_body={"cache_report": True})
    first = client.messages.create(**create).usage.model_extra["cache_report"]
    assert first["reason"] == "not_cached"
    second = client.messages.create(**create).usage
    assert second.model_extra["cache_report"]["reason"] == "full_hit"
    assert second.cache_read_input_tokens == second.model_extra["cache_report"]["cached_tokens"] > 0
    time.sleep(1.0)  # the 5m pin is 0.6 s at cache_ttl_scale 0.002: it lapses, LRU may evict it
    a = keyed.openai(KEY_A)
    _report(a, _ids(20, 11 * BS))
    expired = client.messages.create(**create).usage.model_extra["cache_report"]
    assert expired["reason"] == "ttl_expired", expired


def test_the_request_log_keeps_each_report(keyed):
    records = [json.loads(line) for line in keyed.log.read_text().splitlines()]
    reports = [r["cache_report"] for r in records if "cache_report" in r]
    bodies = [r for r in records if "body" in r]
    assert len(bodies) >= len(reports) > 0
    assert {"not_cached", "full_hit", "diverged", "evicted"} <= {r["reason"] for r in reports}


def test_a_server_option_gives_the_report_to_every_request_and_caching_off_says_so(embedded_model):
    config = ServerConfig(cache_report=True)
    with custom_server(embedded_model, config, num_blocks=64, enable_prefix_caching=False) as server:
        chat = server.openai().chat.completions.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "Hello there, what is new?"}])
        assert chat.usage.model_extra["cache_report"]["reason"] == "caching_off"

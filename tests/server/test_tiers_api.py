"""The storage tier seen from the APIs: usage splits cached tokens by tier (an extension field in
both APIs, read with the official clients) and /metrics reports each tier."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import LONG_SYSTEM, start_server

QUESTION = "When is breakfast served?"
OTHER_SYSTEM = LONG_SYSTEM.replace("Hotel Aurora in Lisbon", "Pension Sol in Porto").replace("rooftop", "garden")


def _labelled(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _extra(model, name: str):
    value = getattr(model, name, None)
    return value if value is not None else (model.model_extra or {}).get(name)


def test_usage_and_metrics_split_cached_tokens_by_tier(embedded_model):
    prompt_tokens = len(embedded_model.tokenizer.encode(LONG_SYSTEM)) + 40  # + template and question
    num_blocks = prompt_tokens // 16 + 4  # one conversation at a time: the next evicts it
    with start_server(embedded_model, num_blocks=num_blocks, kv_store="memory") as srv:
        client = srv.openai()

        def chat(system: str):
            return client.chat.completions.create(
                model="embedded", max_tokens=2, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])

        chat(LONG_SYSTEM)
        chat(OTHER_SYSTEM)  # evicts LONG_SYSTEM's blocks from the device: written down
        srv.engine.tier_io.flush()
        again = chat(LONG_SYSTEM)
        details = again.usage.prompt_tokens_details
        by_tier = _extra(details, "cached_tokens_by_tier")
        assert by_tier["storage"] > 0 and by_tier["host"] == 0
        assert sum(by_tier.values()) == details.cached_tokens

        chat(OTHER_SYSTEM)
        srv.engine.tier_io.flush()
        message = srv.anthropic().messages.create(
            model="embedded", max_tokens=2, system=LONG_SYSTEM, messages=[{"role": "user", "content": QUESTION}])
        by_tier = _extra(message.usage, "cache_read_input_tokens_by_tier")
        assert sum(by_tier.values()) == message.usage.cache_read_input_tokens > 0

        srv.wait_idle()
        m = _labelled(srv.base_url)
        assert m[("radixserve_tier_hit_tokens_total", (("tier", "storage"),))] > 0
        assert m[("radixserve_tier_load_decisions_total", (("decision", "load"),))] >= 1
        assert m[("radixserve_tier_blocks", (("tier", "storage"),))] > 0
        assert m[("radixserve_tier_corrupt_records_total", ())] == 0
        assert m[("radixserve_tier_load_seconds_count", (("tier", "storage"),))] >= 1


def test_tiers_off_leave_the_usage_as_it_was(server):
    response = server.openai().chat.completions.create(
        model="embedded", max_tokens=1, messages=[{"role": "user", "content": QUESTION}])
    assert _extra(response.usage.prompt_tokens_details, "cached_tokens_by_tier") is None
    assert not any(name.startswith("radixserve_tier_") for name, _ in _labelled(server.base_url))

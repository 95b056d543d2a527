"""Named caches (/v1/caches): create, use from both chat APIs, list, patch TTL, delete, expire."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import anthropic
import openai
import pytest

from tests.server.conftest import LONG_SYSTEM
from tests.server.test_openai_api import expected_cached

DOC_SYSTEM = LONG_SYSTEM.replace("Hotel Aurora", "Hotel Meridian")


def _rfc3339(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_named_cache_lifecycle(server):
    http = server.http()
    created = http.post("/v1/caches", json={
        "model": "embedded", "display_name": "hotel faq", "system": DOC_SYSTEM,
        "messages": [{"role": "user", "content": "Remember: the spa opens at 9."},
                     {"role": "assistant", "content": "Noted."}],
        "ttl": "120s",
    })
    assert created.status_code == 200, created.text
    cache = created.json()
    name = cache["name"]
    assert name.startswith("caches/") and cache["display_name"] == "hotel faq"
    assert cache["model"] == "SmolLM2-135M-Instruct"
    expire = _rfc3339(cache["expire_time"])
    assert timedelta(seconds=110) < expire - _rfc3339(cache["create_time"]) <= timedelta(seconds=121)
    tok = server.tokenizer
    cache_turns = [{"role": "system", "content": DOC_SYSTEM},
                   {"role": "user", "content": "Remember: the spa opens at 9."},
                   {"role": "assistant", "content": "Noted."}]
    cache_ids = tok.encode(tok.apply_chat_template(cache_turns, add_generation_prompt=False))
    assert cache["usage_metadata"]["total_token_count"] == len(cache_ids)

    # use it from OpenAI chat: the cache's turns are prepended and read from the prefix cache
    question = [{"role": "user", "content": "When does the spa open?"}]
    r = server.openai().chat.completions.create(model="embedded", messages=question, max_tokens=2,
                                                extra_body={"cached_content": name})
    full_ids = tok.encode(tok.apply_chat_template(cache_turns + question))
    assert r.usage.prompt_tokens == len(full_ids)
    assert r.usage.prompt_tokens_details.cached_tokens == expected_cached(cache_ids, full_ids, 16)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(cache_ids) - 16

    # ... and from Anthropic messages
    m = server.anthropic().messages.create(model="embedded", max_tokens=2,
                                           messages=[{"role": "user", "content": "Is breakfast included?"}],
                                           extra_body={"cached_content": name})
    assert m.usage.cache_read_input_tokens >= len(cache_ids) - 16

    # list and get
    listed = http.get("/v1/caches").json()["cached_contents"]
    assert name in [c["name"] for c in listed]
    assert http.get(f"/v1/{name}").json()["display_name"] == "hotel faq"

    # patch the TTL: shorter, then by expire_time
    patched = http.patch(f"/v1/{name}", json={"ttl": "30s"}).json()
    assert _rfc3339(patched["expire_time"]) < expire
    assert patched["update_time"] >= patched["create_time"]
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    patched = http.patch(f"/v1/{name}", json={"expire_time": later}).json()
    assert abs(_rfc3339(patched["expire_time"]) - _rfc3339(later)) < timedelta(seconds=1)

    # delete: gone for every route, in each API's error format
    assert http.delete(f"/v1/{name}").status_code == 200
    assert http.get(f"/v1/{name}").status_code == 404
    assert http.delete(f"/v1/{name}").status_code == 404
    assert name not in [c["name"] for c in http.get("/v1/caches").json()["cached_contents"]]
    with pytest.raises(openai.NotFoundError, match="not found"):
        server.openai().chat.completions.create(model="embedded", messages=question, max_tokens=1,
                                                extra_body={"cached_content": name})
    with pytest.raises(anthropic.NotFoundError) as e:
        server.anthropic().messages.create(model="embedded", max_tokens=1, messages=question,
                                           extra_body={"cached_content": name})
    assert e.value.body["error"]["type"] == "not_found_error"


def _pinned_blocks(server, namespace: str) -> int:
    """KV blocks unexpired pins hold in `namespace` (the server is idle when called)."""
    return server.engine.pinned_blocks(namespace)


def test_named_cache_expires_and_is_unpinned(server):
    http = server.http()
    salt = f"expiry-{time.time()}"
    cache = http.post("/v1/caches", json={"system_instruction": {"parts": [{"text": LONG_SYSTEM}]},
                                          "contents": [{"role": "user", "parts": [{"text": "Hello"}]}],
                                          "ttl": "2s", "cache_salt": salt}).json()
    name = cache["name"]
    assert _pinned_blocks(server, f"salt:{salt}") > 0
    time.sleep(max(0.0, (_rfc3339(cache["expire_time"]) - datetime.now(UTC)).total_seconds()) + 0.1)
    r = http.get(f"/v1/{name}")
    assert r.status_code == 404 and "expired" in r.json()["error"]["message"]
    assert _pinned_blocks(server, f"salt:{salt}") == 0


def test_sweeper_unpins_expired_caches(server):
    http = server.http()
    salt = f"sweep-{time.time()}"
    cache = http.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "1s", "cache_salt": salt}).json()
    assert _pinned_blocks(server, f"salt:{salt}") > 0
    deadline = time.monotonic() + 10
    while any(c.cache_id in cache["name"] for c in server.state.caches._caches.values()):
        assert time.monotonic() < deadline, "the sweeper did not drop the expired cache"
        time.sleep(0.1)
    assert _pinned_blocks(server, f"salt:{salt}") == 0


def test_delete_unpins_at_once(server):
    http = server.http()
    salt = f"delete-{time.time()}"
    name = http.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "600s", "cache_salt": salt}).json()["name"]
    pinned = _pinned_blocks(server, f"salt:{salt}")
    assert pinned > 0
    twin = http.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "300s", "cache_salt": salt}).json()["name"]
    assert _pinned_blocks(server, f"salt:{salt}") == pinned  # identical content: the same blocks, one pin
    assert http.delete(f"/v1/{name}").status_code == 200
    assert _pinned_blocks(server, f"salt:{salt}") == pinned  # still pinned for the twin
    assert http.delete(f"/v1/{twin}").status_code == 200
    assert _pinned_blocks(server, f"salt:{salt}") == 0  # evictable now, long before 300 s


@pytest.mark.parametrize("body, status, message", [
    ({"system": "too short", "ttl": "60s"}, 400, "too small"),
    ({"system": LONG_SYSTEM, "ttl": "soon"}, 400, "duration"),
    ({"system": LONG_SYSTEM, "ttl": "-5s"}, 400, "duration"),
    ({"system": LONG_SYSTEM, "expire_time": "2001-01-01T00:00:00Z"}, 400, "in the past"),
    ({"system": LONG_SYSTEM, "expire_time": "tomorrow"}, 400, "RFC 3339"),
    ({"system": LONG_SYSTEM, "ttl": "60s", "expire_time": "2099-01-01T00:00:00Z"}, 400, "either"),
    ({"system": LONG_SYSTEM, "model": "gpt-9"}, 404, "gpt-9"),
    ({}, 400, "system instruction or at least one message"),
    ({"messages": [{"role": "robot", "content": LONG_SYSTEM}]}, 400, "robot"),
])
def test_bad_cache_requests(server, body, status, message):
    r = server.http().post("/v1/caches", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_named_cache_rejects_second_system(server):
    http = server.http()
    name = http.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "60s"}).json()["name"]
    try:
        with pytest.raises(openai.BadRequestError, match="system instruction from the cache"):
            server.openai().chat.completions.create(
                model="embedded", max_tokens=1, extra_body={"cached_content": name},
                messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    finally:
        http.delete(f"/v1/{name}")

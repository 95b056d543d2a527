"""API keys (Bearer for OpenAI clients, x-api-key for Anthropic) and key-derived cache namespaces."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from radixserve.server import ServerConfig
from tests.server.conftest import LONG_SYSTEM, SHORT_SYSTEM, start_server

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


@pytest.fixture(scope="module")
def keyed(embedded_model):
    config = ServerConfig(api_keys=[KEY_A, KEY_B], namespace_from_api_key=True, min_cacheable_tokens=32)
    with start_server(embedded_model, config, num_blocks=256) as running:
        yield running


def test_missing_or_wrong_key_is_401(keyed):
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{keyed.base_url}/v1/chat/completions", headers=headers, timeout=30,
                       json={"model": "embedded", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        keyed.openai(api_key="sk-wrong").models.list()
    with pytest.raises(anthropic.AuthenticationError) as e:
        keyed.anthropic(api_key="sk-wrong").messages.create(model="embedded", max_tokens=1,
                                                            messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    # health and metrics stay open for probes and scrapers
    assert httpx.get(f"{keyed.base_url}/health").status_code == 200
    assert httpx.get(f"{keyed.base_url}/metrics").status_code == 200


def test_keys_get_separate_namespaces(keyed):
    messages = [{"role": "system", "content": SHORT_SYSTEM}, {"role": "user", "content": "Where is the pool?"}]

    def cached(key: str) -> int:
        r = keyed.openai(api_key=key).chat.completions.create(model="embedded", messages=messages, max_tokens=1)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(KEY_A) == 0
    assert cached(KEY_A) > 0  # the same tenant hits its own cache
    assert cached(KEY_B) == 0  # the identical prompt under another key does not
    assert cached(KEY_B) > 0

    def anthropic_cached(key: str) -> int:
        m = keyed.anthropic(api_key=key).messages.create(
            model="embedded", max_tokens=1, system="Concierge desk notes. " + SHORT_SYSTEM,
            messages=[{"role": "user", "content": "Hi"}])
        return m.usage.cache_read_input_tokens

    assert anthropic_cached(KEY_B) == 0
    assert anthropic_cached(KEY_B) > 0
    assert anthropic_cached(KEY_A) == 0


def test_cache_salt_splits_a_tenant(keyed):
    client = keyed.openai(api_key=KEY_A)
    messages = [{"role": "system", "content": SHORT_SYSTEM}, {"role": "user", "content": "Airport transfer?"}]

    def cached(salt: str) -> int:
        return client.chat.completions.create(model="embedded", messages=messages, max_tokens=1,
                                              extra_body={"cache_salt": salt}).usage.prompt_tokens_details.cached_tokens

    assert cached("s1") == 0
    assert cached("s1") > 0
    assert cached("s2") == 0


def test_named_caches_belong_to_their_key(keyed):
    a = httpx.Client(base_url=keyed.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    b = httpx.Client(base_url=keyed.base_url, headers={"x-api-key": KEY_B}, timeout=60)
    created = a.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "60s"})
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    assert a.get(f"/v1/{name}").status_code == 200
    assert b.get(f"/v1/{name}").status_code == 404
    assert b.get("/v1/caches").json()["cached_contents"] == []
    with pytest.raises(openai.NotFoundError):
        keyed.openai(api_key=KEY_B).chat.completions.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "hi"}],
            extra_body={"cached_content": name})
    assert b.delete(f"/v1/{name}").status_code == 404
    assert a.delete(f"/v1/{name}").status_code == 200

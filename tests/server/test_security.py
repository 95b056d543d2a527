"""The security campaign's findings, fixed: operator routes need an admin key, named caches
belong to their key in every mode, the API description is not public with keys, /metrics can
be put behind a key, and a per-request cache policy that the key's policy caps."""

from __future__ import annotations

import logging

import anthropic
import httpx
import openai
import pytest

from radixserve.server import ServerConfig
from radixserve.server.app import security_summary
from tests.server.conftest import LONG_SYSTEM, SHORT_SYSTEM, start_server

KEY_A, KEY_B, KEY_PRIVATE, ADMIN, METRICS = "sk-a", "sk-b", "sk-private", "sk-admin", "sk-prometheus"


@pytest.fixture(scope="module")
def shared_keys(embedded_model):
    """Keys WITHOUT per-key namespaces (the shared default): ownership must still follow the key."""
    config = ServerConfig(api_keys=[KEY_A, KEY_B, KEY_PRIVATE], admin_keys=[ADMIN], metrics_keys=[METRICS],
                          key_cache_policies={KEY_PRIVATE: "none"}, min_cacheable_tokens=32)
    with start_server(embedded_model, config, num_blocks=256) as running:
        yield running


def _client(server, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})


def _cached(server, key: str, messages: list[dict], **extra) -> int:
    r = server.openai(api_key=key).chat.completions.create(model="embedded", messages=messages, max_tokens=1,
                                                           extra_body=extra or None)
    return r.usage.prompt_tokens_details.cached_tokens


def test_reset_needs_an_admin_key(shared_keys):
    messages = [{"role": "system", "content": SHORT_SYSTEM}, {"role": "user", "content": "Reset test."}]
    _cached(shared_keys, KEY_B, messages)
    assert _cached(shared_keys, KEY_B, messages) > 0
    assert _client(shared_keys, None).post("/reset_prefix_cache").status_code == 401
    denied = _client(shared_keys, KEY_A).post("/reset_prefix_cache")
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert _cached(shared_keys, KEY_B, messages) > 0  # the tenant's attempt wiped nothing
    with pytest.raises(openai.PermissionDeniedError):
        shared_keys.openai(api_key=KEY_A).post("/../reset_prefix_cache", cast_to=object)
    ok = _client(shared_keys, ADMIN).post("/reset_prefix_cache")
    assert ok.status_code == 200 and ok.json()["freed_blocks"] > 0
    assert _cached(shared_keys, KEY_B, messages) == 0
    # an admin key is an API key too
    assert _cached(shared_keys, ADMIN, messages) > 0


def test_named_caches_belong_to_their_key_without_namespaces(shared_keys):
    a, b = _client(shared_keys, KEY_A), _client(shared_keys, KEY_B)
    created = a.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "60s"})
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    assert a.get(f"/v1/{name}").status_code == 200
    assert [c["name"] for c in a.get("/v1/caches").json()["cached_contents"]] == [name]
    assert b.get("/v1/caches").json()["cached_contents"] == []
    assert b.get(f"/v1/{name}").status_code == 404
    assert b.patch(f"/v1/{name}", json={"ttl": "1s"}).status_code == 404
    assert b.delete(f"/v1/{name}").status_code == 404
    with pytest.raises(openai.NotFoundError):
        shared_keys.openai(api_key=KEY_B).chat.completions.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "hi"}],
            extra_body={"cached_content": name})
    with pytest.raises(anthropic.NotFoundError):
        shared_keys.anthropic(api_key=KEY_B).messages.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "hi"}],
            extra_body={"cached_content": name})
    # the owner still uses, updates and deletes it
    r = shared_keys.openai(api_key=KEY_A).chat.completions.create(
        model="embedded", max_tokens=1, messages=[{"role": "user", "content": "hi"}], extra_body={"cached_content": name})
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert a.patch(f"/v1/{name}", json={"ttl": "120s"}).status_code == 200
    assert a.delete(f"/v1/{name}").status_code == 200


def test_api_description_needs_a_key(shared_keys):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert _client(shared_keys, None).get(path).status_code == 401, path
        assert _client(shared_keys, "sk-wrong").get(path).status_code == 401, path
        assert _client(shared_keys, KEY_A).get(path).status_code == 200, path
    spec = _client(shared_keys, KEY_B).get("/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "/openapi.json" not in spec["paths"]


def test_api_description_is_open_without_keys(server):
    assert httpx.get(f"{server.base_url}/openapi.json").status_code == 200
    assert httpx.get(f"{server.base_url}/docs").status_code == 200


def test_metrics_behind_a_key(shared_keys):
    assert _client(shared_keys, None).get("/metrics").status_code == 401
    assert _client(shared_keys, KEY_A).get("/metrics").status_code == 401  # a tenant key is not enough
    for key in (METRICS, ADMIN):
        r = _client(shared_keys, key).get("/metrics")
        assert r.status_code == 200 and "radixserve_" in r.text
    # a metrics key is not an API key
    with pytest.raises(openai.AuthenticationError):
        shared_keys.openai(api_key=METRICS).models.list()
    assert _client(shared_keys, None).get("/health").status_code == 200  # probes stay open


def test_cache_policy_none_stores_nothing(shared_keys):
    messages = [{"role": "system", "content": "Opt-out desk. " + SHORT_SYSTEM},
                {"role": "user", "content": "Private question."}]
    assert _cached(shared_keys, KEY_A, messages, cache_policy="none") == 0
    assert _cached(shared_keys, KEY_A, messages, cache_policy="none") == 0  # the first stored nothing
    assert _cached(shared_keys, KEY_A, messages, cache_policy="read_only") == 0  # ... really nothing
    assert _cached(shared_keys, KEY_A, messages) == 0  # read_write: computes and stores it
    assert _cached(shared_keys, KEY_A, messages, cache_policy="read_only") > 0
    assert _cached(shared_keys, KEY_A, messages, cache_policy="none") == 0  # none does not read either

    # completions, and Anthropic's breakpoints: a request that may not write pins nothing
    prompt = "Opt-out completion. " + SHORT_SYSTEM
    for _ in range(2):
        c = shared_keys.openai(api_key=KEY_B).completions.create(model="embedded", prompt=prompt, max_tokens=1,
                                                                 extra_body={"cache_policy": "none"})
        assert c.usage.prompt_tokens_details.cached_tokens == 0
    system = [{"type": "text", "text": "Breakpoint opt-out. " + LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):
        m = shared_keys.anthropic(api_key=KEY_B).messages.create(
            model="embedded", max_tokens=1, system=system, messages=[{"role": "user", "content": "Hi"}],
            extra_body={"cache_policy": "read_only"})
        assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0


def test_key_cache_policy_is_a_ceiling(shared_keys):
    messages = [{"role": "system", "content": "HR desk. " + SHORT_SYSTEM}, {"role": "user", "content": "Case notes."}]
    for _ in range(2):  # the key's policy is none: asking for read_write does not lift it
        assert _cached(shared_keys, KEY_PRIVATE, messages, cache_policy="read_write") == 0
    assert _cached(shared_keys, KEY_B, messages) == 0  # and nothing of it reached the shared cache
    created = _client(shared_keys, KEY_PRIVATE).post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "60s"})
    assert created.status_code == 403


def test_bad_cache_policy_is_400(shared_keys):
    with pytest.raises(openai.BadRequestError) as e:
        _cached(shared_keys, KEY_A, [{"role": "user", "content": "hi"}], cache_policy="sometimes")
    assert "cache_policy" in str(e.value)
    with pytest.raises(anthropic.BadRequestError):
        shared_keys.anthropic(api_key=KEY_A).messages.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "hi"}],
            extra_body={"cache_policy": "never"})
    with pytest.raises(openai.BadRequestError, match="cache_policy"):
        _cached(shared_keys, KEY_A, [{"role": "user", "content": "hi"}], cache_policy="none",
                cached_content="caches/whatever")


def test_startup_log_names_the_mode(shared_keys, server):
    shared = security_summary(shared_keys.state)
    assert shared[0][0] == logging.WARNING and "SHARED across 4 API keys" in shared[0][1]
    assert "1 admin key" in shared[1][1] and "behind --metrics-key" in shared[1][1]
    assert "SHARED, no API keys" in security_summary(server.state)[0][1]


def test_config_rejects_unsafe_or_meaningless_settings():
    with pytest.raises(ValueError, match="needs API keys"):
        ServerConfig(namespace_from_api_key=True)
    with pytest.raises(ValueError, match="cache policy"):
        ServerConfig(api_keys=["k"], key_cache_policies={"k": "sometimes"})
    with pytest.raises(ValueError, match="not API keys"):
        ServerConfig(api_keys=["k"], key_cache_policies={"other": "none"})


def test_serve_command_security_options():
    from radixserve.cli import build_parser
    from radixserve.commands.serve import server_config_from_args

    args = build_parser().parse_args([
        "serve", "--api-key", "k1", "--admin-key", "root", "--cache-isolation", "per-key", "--metrics-key", "m",
        "--default-cache-policy", "read_only", "--key-cache-policy", "k1=none",
    ])
    config = server_config_from_args(args)
    assert config.namespace_from_api_key and config.admin_keys == ["root"] and config.metrics_keys == ["m"]
    assert config.default_cache_policy == "read_only" and config.key_cache_policies == {"k1": "none"}
    shared = server_config_from_args(build_parser().parse_args(["serve", "--api-key", "k1"]))
    assert not shared.namespace_from_api_key

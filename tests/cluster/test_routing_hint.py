"""The ingress's routing hint names exactly the blocks the engine stores for that request: the
real server (embedded model) serves each request, its KV-event recorder reports the stored keys,
and they must cover every key the hint computed from the raw HTTP body (same tokens, same
tenant namespace), for the three generation APIs, with API-key isolation and cache_salt."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from radixserve.cache.block_keys import CacheIdentity
from radixserve.cluster.kv_events import STORED, KVEventRecorder
from radixserve.cluster.routing_hint import PieceMemoTokenizer, RoutingProfile, prompt_hint
from radixserve.server import ServerConfig, create_app
from tests.live_server import serve_app

SYSTEM = "You are the routing-hint test assistant. Answer briefly and precisely. " * 6
KEYS = ["sk-a", "sk-b"]


@pytest.fixture(scope="module")
def served(embedded_model):
    from radixserve.config import CacheConfig, EngineConfig, ModelConfig
    from radixserve.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(num_blocks=512)), loaded=embedded_model)
    config = ServerConfig(api_keys=KEYS, namespace_from_api_key=True, min_cacheable_tokens=16)
    app = create_app(engine, config)
    identity = CacheIdentity(model=engine.cache_identity, block_size=engine.block_size)
    recorder = KVEventRecorder(identity)
    assert engine.attach_tree_observer(recorder)
    profile = RoutingProfile(engine.tokenizer, identity, config)
    with serve_app(app) as base:
        yield base, recorder, profile, app.state.radixserve.auth


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"}],
                              "cache_salt": "team-x"}),
    ("/v1/completions", {"prompt": SYSTEM + " Question: hi?"}),
    ("/v1/messages", {"system": SYSTEM, "messages": [{"role": "user", "content": "Hi?"}]}),
])
def test_hint_keys_are_the_blocks_the_engine_stores(served, path, body):
    base, recorder, profile, auth = served
    body = {"model": "embedded", "max_tokens": 2, "temperature": 0, **body}
    # each case its own prompt text, so its blocks are new to the cache (a hit stores nothing)
    raw = json.dumps(body).encode().replace(b"routing-hint test", f"{path} {sorted(body)}".encode())
    for key in KEYS:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        _, hint = prompt_hint(profile, auth, path, headers, raw)
        assert len(hint) >= 4
        recorder.drain("r")
        response = httpx.post(base + path, content=raw, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        stored = {k for e in recorder.drain("r").events if e.kind == STORED for k in e.keys}
        if key == KEYS[0]:
            assert set(hint) <= stored  # a first request stores its whole cacheable prompt
            first_hint = hint
        else:
            assert set(hint) <= stored and set(hint).isdisjoint(first_hint)  # per-key isolation: other keys


def test_hint_takes_the_key_the_server_takes_when_both_headers_come(served):
    """x-api-key and a Bearer token naming different keys: the server takes x-api-key, so the
    hint must be keyed in that key's namespace, or it names blocks nobody stores."""
    base, recorder, profile, auth = served
    system = SYSTEM.replace("routing-hint test", "two-header test")
    raw = json.dumps({"model": "embedded", "max_tokens": 2, "temperature": 0, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "Hi?"}]}).encode()
    headers = {"x-api-key": KEYS[1], "authorization": f"Bearer {KEYS[0]}", "content-type": "application/json"}
    _, hint = prompt_hint(profile, auth, "/v1/chat/completions", headers, raw)
    recorder.drain("r")
    response = httpx.post(base + "/v1/chat/completions", content=raw, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    stored = {k for e in recorder.drain("r").events if e.kind == STORED for k in e.keys}
    assert len(hint) >= 4 and set(hint) <= stored


def test_no_hint_for_a_bad_key_or_a_malformed_body(served):
    _, _, profile, auth = served
    good = json.dumps({"model": "embedded", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
    assert prompt_hint(profile, auth, "/v1/chat/completions", {}, good) == ("", [])
    headers = {"authorization": "Bearer sk-a"}
    assert prompt_hint(profile, auth, "/v1/chat/completions", headers, b"{not json") == ("", [])
    assert prompt_hint(profile, auth, "/v1/models", headers, good) == ("", [])


def test_piece_memo_gives_the_same_hint_and_reuses_the_system_prompt(served):
    _, _, profile, auth = served
    memo = PieceMemoTokenizer(profile.tokenizer, max_chars=2 * len(SYSTEM) + 100)
    memo_profile = dataclasses.replace(profile, tokenizer=memo)
    headers = {"authorization": "Bearer sk-a"}

    def body(system: str, question: str) -> bytes:
        return json.dumps({"model": "embedded", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]}).encode()

    systems = [f"Prompt {n}. " + SYSTEM for n in range(3)]
    expected_hits = 0
    # room for two system prompts (the only pieces long enough to keep): the third pushes out
    # the least recently used
    for n, expect_hit in [(0, False), (1, False), (0, True), (1, True), (2, False), (1, True), (0, False)]:
        raw = body(systems[n], f"Question {expected_hits}?")
        expected = prompt_hint(profile, auth, "/v1/chat/completions", headers, raw)
        assert prompt_hint(memo_profile, auth, "/v1/chat/completions", headers, raw) == expected
        assert len(expected[1]) >= 4
        expected_hits += expect_hit
        assert memo.hits == expected_hits, n
    assert memo._chars <= memo.max_chars

"""Warm restart (--state-dir): named caches and cache_control pins survive a server restart.

Each test runs a real server on a free loopback port, stops it (the lifespan shutdown SIGTERM
runs), and starts a new one over the same state directory. tests/server/test_restart_process.py
does the same with `radixserve serve` processes, SIGTERM and kill -9.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from radixserve.server import ServerConfig
from radixserve.server.persistence import STATE_FILE_NAME, StateDirLockedError, decode_tokens, encode_tokens
from tests.server.conftest import LONG_SYSTEM, start_server

KEYS = ["sk-alice", "sk-bob"]
DOC = LONG_SYSTEM.replace("Hotel Aurora", "Hotel Restart")
PIN_DOC = LONG_SYSTEM.replace("Hotel Aurora", "Hotel Breakpoint")
SHORT_PIN_DOC = LONG_SYSTEM.replace("Hotel Aurora", "Hotel Lapse")


def _config(state_dir: Path, **kw) -> ServerConfig:
    return ServerConfig(min_cacheable_tokens=32, state_dir=str(state_dir), api_keys=list(KEYS), **kw)


def _wait_warm(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.state.keeper.warm_done.is_set():
        assert time.monotonic() < deadline, "the warm-up did not finish"
        time.sleep(0.05)
    server.wait_idle()


def _create_cache(server, ttl: str, system: str = DOC, key: str = "sk-alice") -> dict:
    r = server.http(headers={"x-api-key": key}).post("/v1/caches", json={"model": "embedded", "system": system,
                                                                         "ttl": ttl})
    assert r.status_code == 200, r.text
    return r.json()


def _pin_request(server, doc: str, ttl: str, question: str):
    system = [{"type": "text", "text": doc, "cache_control": {"type": "ephemeral", "ttl": ttl}}]
    return server.anthropic(api_key="sk-alice").messages.create(
        model="embedded", max_tokens=1, system=system, messages=[{"role": "user", "content": question}])


def _saved(state_dir: Path) -> dict:
    return json.loads((state_dir / STATE_FILE_NAME).read_text())["data"]


@pytest.mark.slow
def test_named_cache_and_pin_come_back_after_a_restart(embedded_model, tmp_path: Path):
    with start_server(embedded_model, _config(tmp_path)) as a:
        cache = _create_cache(a, "3600s")
        first = _pin_request(a, PIN_DOC, "1h", "Is there a gym?")
        pinned = first.usage.cache_creation_input_tokens
        assert pinned > 64
        deadline = time.monotonic() + 10  # the pin is saved by the saver task, within a second or two
        while not any(e["expire_time"] for e in _saved(tmp_path)["pin_edges"] if e["namespace"] == ""):
            assert time.monotonic() < deadline, _saved(tmp_path)
            time.sleep(0.1)
    saved = _saved(tmp_path)
    assert [c["id"] for c in saved["named_caches"]] == [cache["name"].removeprefix("caches/")]
    assert "sk-alice" not in (tmp_path / STATE_FILE_NAME).read_text()  # owners are the keys' hashes
    assert oct((tmp_path / STATE_FILE_NAME).stat().st_mode & 0o777) == "0o600"

    with start_server(embedded_model, _config(tmp_path)) as b:
        alice, bob = b.http(headers={"x-api-key": "sk-alice"}), b.http(headers={"x-api-key": "sk-bob"})
        # the name resolves at once, with the same expiry, and only for its owner
        got = alice.get(f"/v1/{cache['name']}")
        assert got.status_code == 200, got.text
        assert got.json()["expire_time"] == cache["expire_time"]
        assert bob.get(f"/v1/{cache['name']}").status_code == 404
        assert [c["name"] for c in alice.get("/v1/caches").json()["cached_contents"]] == [cache["name"]]
        assert bob.get("/v1/caches").json()["cached_contents"] == []
        assert bob.post("/v1/chat/completions", json={
            "model": "embedded", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
            "cached_content": cache["name"]}).status_code == 404
        assert bob.delete(f"/v1/{cache['name']}").status_code == 404
        _wait_warm(b)
        # the warm-up recomputed both prefixes and pinned them again: the first requests read them
        use = b.openai(api_key="sk-alice").chat.completions.create(
            model="embedded", max_tokens=1, messages=[{"role": "user", "content": "When is breakfast?"}],
            extra_body={"cached_content": cache["name"]})
        assert use.usage.prompt_tokens_details.cached_tokens >= cache["usage_metadata"]["total_token_count"] - 16
        again = _pin_request(b, PIN_DOC, "1h", "Is there a sauna?")
        assert again.usage.cache_read_input_tokens >= pinned - 16
        # the pins hold: an admin-free check through the engine's own view of its pins
        edges = b.state.async_engine.engine.pinned_paths()
        assert sum(len(e.tokens) for e in edges) >= pinned - 16


@pytest.mark.slow
def test_expired_entries_are_gone_after_a_restart(embedded_model, tmp_path: Path, caplog):
    with start_server(embedded_model, _config(tmp_path)) as a:
        short = _create_cache(a, "3600s")
        long = _create_cache(a, "3600s", system=DOC + " Long-lived.")
        _pin_request(a, SHORT_PIN_DOC, "1h", "Is there a bar?")
        _pin_request(a, PIN_DOC, "1h", "Is there a gym?")
        a.wait_idle()
    # The server stayed down past the expiry of one cache and one pin (the saved times are
    # wall-clock): move those two into the past.
    path = tmp_path / STATE_FILE_NAME
    envelope = json.loads(path.read_text())
    data = envelope["data"]
    assert len(data["named_caches"]) == 2
    next(c for c in data["named_caches"] if c["id"] in short["name"])["expire_time"] = time.time() - 1
    pinned = [e for e in data["pin_edges"] if e["expire_time"] is not None]
    assert len(pinned) == 2
    next(e for e in pinned if "Lapse" in _text(embedded_model, e))["expire_time"] = time.time() - 1
    path.write_text(json.dumps(envelope))
    with caplog.at_level(logging.INFO, logger="radixserve"):
        with start_server(embedded_model, _config(tmp_path)) as b:
            alice = b.http(headers={"x-api-key": "sk-alice"})
            assert alice.get(f"/v1/{short['name']}").status_code == 404
            assert alice.get(f"/v1/{long['name']}").status_code == 200
            _wait_warm(b)
            # only the live pin was re-created, and the lapsed one's prefix was not recomputed
            paths = b.state.async_engine.engine.pinned_paths()
            texts = [b.tokenizer.decode(e.tokens) for e in paths]
            assert any("Breakpoint" in t for t in texts) and not any("Lapse" in t for t in texts)
            assert b.engine.stats.finished_requests == 2  # the warm-up: one cache, one pin path
    assert "dropped 2 expired" in caplog.text


def _text(loaded, edge: dict) -> str:
    return loaded.tokenizer.decode(decode_tokens(edge["tokens"]))


def test_a_corrupt_state_file_is_set_aside_and_the_server_starts_empty(embedded_model, tmp_path: Path, caplog):
    content = b'{"format": "radixserve-state", "version": 1, "data": {"named_caches": [\x00\xff'  # torn, binary
    (tmp_path / STATE_FILE_NAME).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        with start_server(embedded_model, _config(tmp_path)) as s:
            alice = s.http(headers={"x-api-key": "sk-alice"})
            assert alice.get("/v1/caches").json()["cached_contents"] == []
            cache = _create_cache(s, "3600s")  # and it keeps working: the new state is saved
    assert "starting empty" in caplog.text and STATE_FILE_NAME in caplog.text
    assert (tmp_path / (STATE_FILE_NAME + ".corrupt")).read_bytes() == content
    assert [c["id"] for c in _saved(tmp_path)["named_caches"]] == [cache["name"].removeprefix("caches/")]


@pytest.mark.slow
def test_undecodable_entries_are_skipped_and_the_rest_restored(embedded_model, tmp_path: Path, caplog):
    with start_server(embedded_model, _config(tmp_path)) as a:
        cache = _create_cache(a, "3600s")
    path = tmp_path / STATE_FILE_NAME
    envelope = json.loads(path.read_text())
    envelope["data"]["named_caches"].append({"id": 7, "turns": "nope"})
    envelope["data"]["pin_edges"].append({"namespace": "", "parent": 5, "tokens": "!!", "expire_time": 1e12,
                                          "refresh": 1.0})
    path.write_text(json.dumps(envelope))
    with caplog.at_level(logging.WARNING):
        with start_server(embedded_model, _config(tmp_path)) as b:
            assert b.http(headers={"x-api-key": "sk-alice"}).get(f"/v1/{cache['name']}").status_code == 200
    assert "2 entries that cannot be decoded" in caplog.text
    assert (tmp_path / (STATE_FILE_NAME + ".corrupt")).exists()


@pytest.mark.slow
def test_pins_saved_by_another_model_are_dropped(embedded_model, tmp_path: Path, caplog):
    with start_server(embedded_model, _config(tmp_path)) as a:
        _pin_request(a, PIN_DOC, "1h", "Is there a gym?")
        a.wait_idle()
    path = tmp_path / STATE_FILE_NAME
    envelope = json.loads(path.read_text())
    assert any(e["expire_time"] for e in envelope["data"]["pin_edges"])
    envelope["data"]["cache_identity"] = "another-model@0000/float32"
    path.write_text(json.dumps(envelope))
    with caplog.at_level(logging.INFO, logger="radixserve"):
        with start_server(embedded_model, _config(tmp_path)) as b:
            _wait_warm(b)
            assert b.state.async_engine.engine.pinned_paths() == []
    assert "saved by another model" in caplog.text


def test_a_deleted_cache_stays_deleted_after_a_restart(embedded_model, tmp_path: Path):
    with start_server(embedded_model, _config(tmp_path)) as a:
        cache = _create_cache(a, "3600s")
        assert a.http(headers={"x-api-key": "sk-alice"}).delete(f"/v1/{cache['name']}").status_code == 200
    assert _saved(tmp_path)["named_caches"] == []
    with start_server(embedded_model, _config(tmp_path)) as b:
        assert b.http(headers={"x-api-key": "sk-alice"}).get(f"/v1/{cache['name']}").status_code == 404


def test_the_named_cache_limit_and_one_server_per_state_dir(embedded_model, tmp_path: Path):
    from radixserve.server.persistence import StateKeeper

    with start_server(embedded_model, _config(tmp_path, max_named_caches=1)) as s:
        _create_cache(s, "3600s")
        r = s.http(headers={"x-api-key": "sk-alice"}).post("/v1/caches", json={
            "model": "embedded", "system": DOC + " another", "ttl": "60s"})
        assert r.status_code == 429 and "--max-named-caches" in r.json()["error"]["message"]
        with pytest.raises(StateDirLockedError, match="in use by another server"):
            StateKeeper(s.state, str(tmp_path)).restore()


def test_without_a_state_dir_nothing_is_written(embedded_model, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with start_server(embedded_model, ServerConfig(min_cacheable_tokens=32)) as s:
        _create_cache(s, "60s", key="none")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tokens", [[], [0], [1, 2, 3], [2**32 - 1, 151_000, 7]])
def test_token_encoding_round_trips(tokens):
    assert decode_tokens(encode_tokens(tokens)) == tokens


def test_token_decoding_refuses_a_partial_id():
    with pytest.raises(ValueError):
        decode_tokens("AAAA" + "AAA=")  # 3 + 2 bytes
    with pytest.raises(ValueError):
        decode_tokens("not base64!")



def test_the_warm_up_plan_sends_one_request_per_deepest_pin():
    from radixserve.cache.radix_tree import PinnedEdge
    from radixserve.server.persistence import decode_state, encode_state, plan_pin_warmup

    # root -[0..3]-> A (pinned) -[4..7]-> B (pinned); A -[8..9]-> C (lapsed); root -[20..21]-> D in "x"
    edges = [
        PinnedEdge("", -1, [0, 1, 2, 3], 100.0, 300.0),
        PinnedEdge("", 0, [4, 5, 6, 7], 200.0, 0.0),
        PinnedEdge("", 0, [8, 9], -5.0, 0.0),
        PinnedEdge("x", -1, [20, 21], None, 0.0),
        PinnedEdge("x", 3, [22, 23], 50.0, 3600.0),
    ]
    data = encode_state(model="m", cache_identity="id", named_caches=[], edges=edges, now=1000.0)
    data = json.loads(json.dumps(data))
    loaded = decode_state(data, model="m", cache_identity="id", now=1000.5, tokenizer=None)
    assert loaded.dropped_expired == 1 and loaded.bad_entries == 0
    plan = plan_pin_warmup(loaded.pins)
    assert [(w.namespace, w.token_ids, [(len(p.token_ids), p.expire_time, p.refresh) for p in w.pins])
            for w in plan] == [
        ("", [0, 1, 2, 3, 4, 5, 6, 7], [(8, 1200.0, 0.0), (4, 1100.0, 300.0)]),
        ("x", [20, 21, 22, 23], [(4, 1050.0, 3600.0)]),
    ]
    assert decode_state(data, model="m", cache_identity="other", now=1000.5, tokenizer=None).pins == []


def test_a_named_caches_own_pin_is_not_saved_as_a_pin():
    from radixserve.cache.radix_tree import PinnedEdge
    from radixserve.server.caches import NamedCache
    from radixserve.server.persistence import encode_state

    def named(tokens):
        return NamedCache(cache_id=str(tokens[0]), display_name="", model="m", owner="", namespace="", turns=[],
                          token_ids=tokens + [99], create_time=0.0, update_time=0.0, expire_time=2000.0,
                          pinned_tokens=len(tokens))

    edges = [
        PinnedEdge("", -1, [0, 1, 2, 3], 1000.0, 0.0),  # named cache A's own pin...
        PinnedEdge("", 0, [4, 5], 500.0, 300.0),  # ... with a cache_control pin below it
        PinnedEdge("", -1, [7, 8], 1000.0, 0.0),  # named cache C's own pin, nothing else
        PinnedEdge("", -1, [9, 9], 1000.0, 0.0),  # a fixed pin that no named cache owns
    ]
    data = encode_state(model="m", cache_identity="id", named_caches=[named([0, 1, 2, 3]), named([7, 8])],
                        edges=edges, now=0.0)
    saved = [(e["parent"], decode_tokens(e["tokens"]), e["expire_time"]) for e in data["pin_edges"]]
    assert saved == [(-1, [0, 1, 2, 3], None), (0, [4, 5], 500), (-1, [9, 9], 1000)]

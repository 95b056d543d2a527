"""Bad input gets a 4xx in the right API's error format with a clear message; serving goes on."""

from __future__ import annotations

import json

import pytest

CHAT = "/v1/chat/completions"
MSG = "/v1/messages"
USER = [{"role": "user", "content": "hi"}]


def _openai_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def _anthropic_error(r, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


@pytest.mark.parametrize("payload, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": USER}, 400, "model: field required"),
    ({"model": "embedded"}, 400, "messages: field required"),
    ({"model": "embedded", "messages": []}, 400, "messages"),
    ({"model": "gpt-9", "messages": USER}, 404, "gpt-9"),
    ({"model": "embedded", "messages": USER, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "embedded", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "embedded", "messages": USER, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "embedded", "messages": USER, "temperature": -1}, 400, "temperature"),
    ({"model": "embedded", "messages": USER, "n": 17}, 400, "n must be between 1 and 16"),
    ({"model": "embedded", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "embedded", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only 'text'"),
    ({"model": "embedded", "messages": USER, "stop": ["", "x"]}, 400, "stop strings must be non-empty"),
    ({"model": "embedded", "messages": USER, "tools": [{"type": "function"}]}, 400, "tools.0.function: field required"),
])
def test_openai_chat_bad_input(server, payload, status, needle):
    with server.http() as http:
        if isinstance(payload, bytes):
            r = http.post(CHAT, content=payload, headers={"content-type": "application/json"})
        else:
            r = http.post(CHAT, json=payload)
    err = _openai_error(r, status)
    assert needle in err["message"]


def test_openai_errors_name_the_param(server):
    with server.http() as http:
        err = _openai_error(http.post(CHAT, json={"model": "embedded", "messages": USER, "max_tokens": -1}), 400)
        assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
        err = _openai_error(http.post(CHAT, json={"model": "nope", "messages": USER}), 404)
        assert err["code"] == "model_not_found"


def test_too_long_prompts(server):
    with server.http() as http:
        err = _openai_error(http.post("/v1/completions", json={"model": "embedded", "prompt": [11] * 9000}), 400)
        assert err["code"] == "context_length_exceeded" and "8192" in err["message"]
        err = _openai_error(http.post("/v1/completions", json={"model": "embedded", "prompt": [11] * 8000,
                                                               "max_tokens": 500}), 400)
        assert "max_tokens" in err["message"]
        long_text = "hello " * 9000
        err = _openai_error(http.post(CHAT, json={"model": "embedded",
                                                  "messages": [{"role": "user", "content": long_text}]}), 400)
        assert err["code"] == "context_length_exceeded"
        msg = _anthropic_error(http.post(MSG, json={"model": "embedded", "max_tokens": 10,
                                                    "messages": [{"role": "user", "content": long_text}]}),
                               400, "invalid_request_error")
        assert "context length" in msg
        err = _openai_error(http.post("/v1/completions", json={"model": "embedded", "prompt": [10**9]}), 400)
        assert "vocabulary" in err["message"]


@pytest.mark.parametrize("payload, needle", [
    (b"{oops", "not valid JSON"),
    ({"model": "embedded", "messages": USER}, "max_tokens: field required"),
    ({"model": "embedded", "max_tokens": 5}, "messages: field required"),
    ({"model": "embedded", "max_tokens": -1, "messages": USER}, "max_tokens"),
    ({"model": "embedded", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "embedded", "max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
    ({"model": "embedded", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"model": "embedded", "max_tokens": 5, "messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b "}]}, "trailing whitespace"),
])
def test_anthropic_bad_input(server, payload, needle):
    with server.http() as http:
        if isinstance(payload, bytes):
            r = http.post(MSG, content=payload, headers={"content-type": "application/json"})
        else:
            r = http.post(MSG, json=payload)
    assert needle in _anthropic_error(r, 400, "invalid_request_error")


def test_body_size_limit(server):
    limit = server.state.config.max_request_bytes
    big = json.dumps({"model": "embedded", "messages": [{"role": "user", "content": "x" * (limit + 10)}]})
    with server.http() as http:
        assert "too large" in _openai_error(http.post(CHAT, content=big), 413)["message"]
        msg = _anthropic_error(http.post(MSG, content=big), 413, "request_too_large")
        assert str(limit) in msg

        # a chunked body (no Content-Length) is cut off while it is read
        def chunks():
            for _ in range(limit // 65536 + 2):
                yield b"x" * 65536

        assert "too large" in _openai_error(http.post(CHAT, content=chunks()), 413)["message"]


def test_unknown_routes_and_methods(server):
    with server.http() as http:
        assert "no such endpoint" in _openai_error(http.post("/v1/embeddings", json={}), 404)["message"]
        assert "not allowed" in _openai_error(http.get(CHAT), 405)["message"]


def test_still_healthy_after_errors(server):
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        r = http.post(CHAT, json={"model": "embedded", "messages": USER, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- issue #12: what a fault campaign sent -------------------------------------------------
COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize("path, payload, param", [
    # a seed outside the 64-bit range used to fail the whole engine step (everyone's requests)
    (CHAT, {"model": "embedded", "messages": USER, "max_tokens": 2, "temperature": 1, "seed": 2**64}, "seed"),
    (COMPLETIONS, {"model": "embedded", "prompt": "a", "max_tokens": 2, "temperature": 1, "seed": -(2**63) - 1},
     "seed"),
    # no lax coercion: OpenAI rejects these
    (CHAT, {"model": "embedded", "messages": USER, "max_tokens": True}, "max_tokens"),
    (CHAT, {"model": "embedded", "messages": USER, "max_tokens": "3"}, "max_tokens"),
    (CHAT, {"model": "embedded", "messages": USER, "stream": "yes"}, "stream"),
    (CHAT, {"model": "embedded", "messages": USER, "max_tokens": 2.0}, "max_tokens"),
    (COMPLETIONS, {"model": "embedded", "prompt": "a", "stream": 1}, "stream"),
    # lone surrogates anywhere in the text
    (CHAT, {"model": "embedded", "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    (COMPLETIONS, {"model": "embedded", "prompt": ["ok", "\udfff"]}, "prompt.1"),
])
def test_openai_edge_validation(server, path, payload, param):
    with server.http() as http:
        r = http.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
        err = _openai_error(r, 400)
        assert err["param"] == param, err


@pytest.mark.parametrize("body, needle", [
    (b'{"model": "embedded", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests too deeply"),
    (b'{"model": "embedded", "x": ' + b"[" * 100 + b"]" * 100 + b"}", "levels deep"),
    (b'{"model": "embedded", "temperature": NaN, "messages": []}', "NaN"),
    (b'{"model": "embedded", "temperature": 1e400, "messages": []}', "out of range"),
    (b'{"model": "embedded", "max_tokens": 1' + b"0" * 5000 + b', "messages": []}', "not valid JSON"),
])
def test_hostile_json_is_a_400_on_every_api(server, body, needle):
    headers = {"content-type": "application/json"}
    with server.http() as http:
        assert needle in _openai_error(http.post(CHAT, content=body, headers=headers), 400)["message"]
        assert needle in _anthropic_error(http.post(MSG, content=body, headers=headers), 400, "invalid_request_error")
        assert needle in _openai_error(http.post("/v1/caches", content=body, headers=headers), 400)["message"]


@pytest.mark.parametrize("cache_control, needle", [
    ({"type": "ephemeral", "ttl": ["5m"]}, "ttl"),
    ({"type": "ephemeral", "ttl": {"m": 5}}, "ttl"),
    ({"type": "ephemeral", "ttl": 300}, "ttl"),
])
def test_anthropic_cache_control_ttl_must_be_a_string(server, cache_control, needle):
    payload = {"model": "embedded", "max_tokens": 2,
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": cache_control}]}]}
    with server.http() as http:
        assert needle in _anthropic_error(http.post(MSG, json=payload), 400, "invalid_request_error")
        payload["stream"] = "yes"
        payload["messages"][0]["content"][0].pop("cache_control")
        assert "stream" in _anthropic_error(http.post(MSG, json=payload), 400, "invalid_request_error")


@pytest.mark.parametrize("ttl", [1e300, 2**63, 1e11, True, [1], "1e400s", "NaN"])
def test_named_cache_bad_ttl_is_a_400_and_stores_nothing(server, ttl):
    from tests.server.conftest import LONG_SYSTEM

    with server.http() as http:
        before = http.get("/v1/caches").json()["cached_contents"]
        err = _openai_error(http.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": ttl}), 400)
        assert err["param"] == "ttl", err
        assert http.get("/v1/caches").json()["cached_contents"] == before
        name = http.post("/v1/caches", json={"system": LONG_SYSTEM, "ttl": "60s"}).json()["name"]
        assert _openai_error(http.patch(f"/v1/{name}", json={"ttl": ttl}), 400)["param"] == "ttl"
        assert http.get(f"/v1/{name}").status_code == 200
        http.delete(f"/v1/{name}")


def test_a_body_shorter_than_its_content_length_times_out(embedded_model):
    import socket

    from radixserve.server import ServerConfig
    from tests.server.conftest import start_server

    with start_server(embedded_model, ServerConfig(body_read_timeout=0.5), num_blocks=64) as srv:
        host, port = srv.base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": ")
            reply = b""
            while b'"error"' not in reply and (chunk := sock.recv(65536)):
                reply += chunk
        reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert '"error"' in reply


def test_a_500_is_json_and_keeps_the_connection(embedded_model):
    import socket

    from radixserve.config import CacheConfig, EngineConfig, ModelConfig
    from radixserve.engine import LLMEngine
    from radixserve.server import create_app
    from tests.live_server import serve_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(num_blocks=32)), loaded=embedded_model)
    app = create_app(engine)

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("a bug")

    def read_response(sock) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
        while len(body) < length:
            body += sock.recv(65536)
        return head + b"\r\n\r\n" + body

    with serve_app(app) as base_url:
        host, port = base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"GET /v1/boom HTTP/1.1\r\nHost: x\r\n\r\n")
            first = read_response(sock)
            assert first.startswith(b"HTTP/1.1 500") and b'"server_error"' in first and b"a bug" in first
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
            assert read_response(sock).startswith(b"HTTP/1.1 200")

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
    ({"model": "embedded", "messages": USER, "n": 3}, 400, "n must be between 1 and 1"),
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

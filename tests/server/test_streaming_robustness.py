"""Clients that hang up get their requests aborted and blocks freed; 50 concurrent streams work."""

from __future__ import annotations

import asyncio

import httpx
import pytest

LONG_RUN = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def _assert_no_leak(server, before: dict[str, float]) -> dict[str, float]:
    m = server.wait_idle()
    assert m["radixserve_kv_free_blocks"] + m["radixserve_prefix_cache_blocks"] == m["radixserve_kv_total_blocks"]
    assert m["radixserve_requests_aborted_total"] == before["radixserve_requests_aborted_total"] + 1
    # it stopped long before its 3000 tokens
    assert m["radixserve_generation_tokens_total"] - before["radixserve_generation_tokens_total"] < 1000
    return m


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}),
    ("/v1/completions", {"prompt": "Once upon a time", "stream": True}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}),
])
def test_disconnect_mid_stream_aborts_and_frees_blocks(server, path, body):
    before = server.wait_idle()
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", path, json={"model": "embedded", **LONG_RUN, **body}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = 0
            for line in lines:
                if line.startswith("data:") and ("text" in line or "content" in line):
                    received += 1
                if received >= 3:
                    break
            running = server.metrics()["radixserve_num_requests_running"]
            assert running == 1
        # leaving the block closes the connection mid-stream
    _assert_no_leak(server, before)


def test_disconnect_while_waiting_for_non_streamed_reply(server):
    before = server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", timeout=1.5,
                   json={"model": "embedded", **LONG_RUN, "messages": [{"role": "user", "content": "Go on."}]})
    _assert_no_leak(server, before)


@pytest.mark.slow
def test_fifty_concurrent_streams(server):
    tok = server.tokenizer
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(50)]
    system = "You are a calculator. Reply with the number only."

    async def one(client, question: str):
        stream = await client.chat.completions.create(
            model="embedded", max_tokens=4, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            extra_body={"ignore_eos": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    async def main():
        client = server.async_openai()
        try:
            return await asyncio.gather(*(one(client, q) for q in questions))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 50
    for question, (text, usage) in zip(questions, results):
        ids = tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": question}]))
        assert usage is not None
        assert usage.prompt_tokens == len(ids)
        assert usage.completion_tokens == 4
        assert usage.total_tokens == len(ids) + 4
        assert 0 <= usage.prompt_tokens_details.cached_tokens < len(ids)
    # the shared system prompt was computed once and read by (nearly) everyone else
    assert sum(u.prompt_tokens_details.cached_tokens > 0 for _, u in results) >= 40
    m = server.wait_idle()
    assert m["radixserve_kv_free_blocks"] + m["radixserve_prefix_cache_blocks"] == m["radixserve_kv_total_blocks"]
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}

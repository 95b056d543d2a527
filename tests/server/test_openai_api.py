"""OpenAI API through the official openai client: chat, completions, streaming, cached tokens."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.server.conftest import LONG_SYSTEM


def expected_cached(first: list[int], second: list[int], block_size: int) -> int:
    """What the engine must report for `second` after `first` was cached: the shared prefix in
    whole blocks, keeping the last prompt token out (it is recomputed for its logits)."""
    k = 0
    while k < min(len(first), len(second)) and first[k] == second[k]:
        k += 1
    return block_size * (min(k, len(second) - 1) // block_size)


def chat_ids(server, messages) -> list[int]:
    tok = server.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def test_models(server):
    client = server.openai()
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"


def test_chat_non_streaming(server):
    client = server.openai()
    salt = uuid.uuid4().hex  # a fresh namespace: nothing cached yet
    r = client.chat.completions.create(
        model="embedded", messages=[{"role": "user", "content": "Say hello."}], max_tokens=5, temperature=0,
        extra_body={"cache_salt": salt},
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    ids = chat_ids(server, [{"role": "user", "content": "Say hello."}])
    assert r.usage.prompt_tokens == len(ids)
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming_matches_non_streaming(server):
    client = server.openai()
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(server):
    chunks = list(server.openai().chat.completions.create(
        model="embedded", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
    ))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_completions(server):
    client = server.openai()
    r = client.completions.create(model="embedded", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.prompt_tokens == len(server.tokenizer.encode("The capital of France is"))
    assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"

    streamed = list(client.completions.create(model="embedded", prompt="The capital of France is", max_tokens=4,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_batch_and_token_ids(server):
    client = server.openai()
    ids = server.tokenizer.encode("One, two, three,")
    r = client.completions.create(model="embedded", prompt=["Roses are red,", "One, two, three,"], max_tokens=3,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    by_ids = client.completions.create(model="embedded", prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == r.choices[1].text
    streamed = list(client.completions.create(model="embedded", prompt=["Roses are red,", "One, two, three,"],
                                              max_tokens=3, temperature=0, stream=True))
    for i in (0, 1):
        text = "".join(c.choices[0].text for c in streamed if c.choices[0].index == i)
        assert text == r.choices[i].text


def test_second_request_reports_exact_cached_tokens(server):
    client = server.openai()
    salt = uuid.uuid4().hex
    first_msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "When is breakfast?"}]
    second_msgs = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Is there a pool?"}]
    kw = dict(model="embedded", max_tokens=2, temperature=0, extra_body={"cache_salt": salt})
    first = client.chat.completions.create(messages=first_msgs, **kw)
    second = client.chat.completions.create(messages=second_msgs, **kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    want = expected_cached(chat_ids(server, first_msgs), chat_ids(server, second_msgs), server.engine.block_size)
    assert want >= 100
    assert second.usage.prompt_tokens_details.cached_tokens == want
    # streamed usage reports the same engine count
    third = list(client.chat.completions.create(messages=second_msgs, stream=True,
                                                stream_options={"include_usage": True}, **kw))
    assert third[-1].usage.prompt_tokens_details.cached_tokens == expected_cached(
        chat_ids(server, second_msgs), chat_ids(server, second_msgs), server.engine.block_size)


def test_completions_cached_tokens(server):
    client = server.openai()
    prompt = LONG_SYSTEM + "Question: what time is checkout?"
    kw = dict(model="embedded", max_tokens=2, temperature=0, extra_body={"cache_salt": uuid.uuid4().hex})
    assert client.completions.create(prompt=prompt, **kw).usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(prompt=prompt, **kw)
    ids = server.tokenizer.encode(prompt)
    assert again.usage.prompt_tokens_details.cached_tokens == expected_cached(ids, ids, 16)


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.openai().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    err = e.value.body
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]

"""n > 1 through the official openai client against a real server: the choices share one
prefill (the prompt-token counter on /metrics moves once), sample independently, stream with
their `index`, and usage counts the prompt once."""

from __future__ import annotations

import uuid

import pytest

from tests.server.test_bad_requests import _openai_error

MESSAGES = [{"role": "user", "content": "Name a colour and say why you like it."}]


@pytest.mark.slow
def test_chat_n3_greedy_gives_three_equal_choices_and_prompt_counted_once(server):
    client = server.openai()
    salt = uuid.uuid4().hex  # a namespace of its own: nothing cached, the prefill is real
    before = server.wait_idle()["radixserve_computed_prompt_tokens_total"]
    r = client.chat.completions.create(model="embedded", messages=MESSAGES, n=3, max_tokens=8, temperature=0,
                                       extra_body={"cache_salt": salt})
    after = server.wait_idle()["radixserve_computed_prompt_tokens_total"]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1 and r.choices[0].message.content
    one = client.chat.completions.create(model="embedded", messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once, not three times
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert after - before == r.usage.prompt_tokens  # computed once for three choices


@pytest.mark.slow
def test_completions_seeded_choices_are_reproducible_and_distinct(server):
    client = server.openai()

    def run():
        r = client.completions.create(model="embedded", prompt=["Once upon a time", "The recipe needs"], n=3,
                                      max_tokens=8, temperature=1.0, seed=1234)
        return [(c.index, c.text) for c in r.choices], r.usage

    first, usage = run()
    again, _ = run()
    assert [i for i, _ in first] == list(range(6))  # prompt number * n + choice
    assert first == again  # each choice has its own derived seed: reproducible
    assert len({text for _, text in first[:3]}) > 1  # ...and the choices of one prompt differ
    prompt_tokens = sum(len(server.tokenizer.encode(p)) for p in ("Once upon a time", "The recipe needs"))
    assert usage.prompt_tokens == prompt_tokens


def test_streaming_n2_carries_the_choice_index(server):
    client = server.openai()
    whole = client.chat.completions.create(model="embedded", messages=MESSAGES, n=2, max_tokens=8, temperature=0)
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in client.chat.completions.create(model="embedded", messages=MESSAGES, n=2, max_tokens=8,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert set(finishes) == {0, 1}
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == whole.usage.completion_tokens

    pieces = {0: "", 1: ""}
    for chunk in client.completions.create(model="embedded", prompt="Once upon a time", n=2, max_tokens=6,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert pieces[0] == pieces[1] and pieces[0]


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": "x"}),
])
def test_n_over_the_maximum_is_a_400_naming_n(server, path, body):
    with server.http() as http:
        r = http.post(path, json={"model": "embedded", "max_tokens": 2, "n": 17, **body})
    err = _openai_error(r, 400)
    assert err["param"] == "n" and "between 1 and 16" in err["message"], err


def test_each_choice_gets_its_own_grammar_and_logprobs(server):
    client = server.openai()
    r = client.chat.completions.create(model="embedded", messages=MESSAGES, n=2, max_tokens=16, temperature=1.0,
                                       seed=3, logprobs=True, top_logprobs=2,
                                       response_format={"type": "json_object"})
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.message.content.startswith("{")  # each choice decodes under its own grammar
        assert choice.logprobs.content and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert r.usage.completion_tokens >= sum(len(c.logprobs.content) for c in r.choices)

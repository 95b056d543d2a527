"""response_format through the official openai client: json_object, json_schema (strict) and
logprobs. The 200-request run checks that every json_schema reply parses and validates; it
keeps max_tokens short and the schemas small (bounded strings, enums, small integers and
arrays), runs requests concurrently, and samples at temperature 1 so the outputs vary."""

from __future__ import annotations

import asyncio
import json
import uuid

import jsonschema
import pytest

SCHEMAS = [
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                      "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                                      "sunny": {"type": "boolean"}},
     "required": ["city", "sunny"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -50, "maximum": 50},
                                      "unit": {"type": ["string", "null"], "maxLength": 6}},
     "required": ["n", "unit"], "additionalProperties": False},
]
QUESTIONS = ["Is the sky blue?", "Where is it sunny today?", "Pick some colours.", "Give me a number.",
             "Describe Paris.", "What do you think?", "Answer in JSON.", "Hello!"]


@pytest.mark.slow
def test_json_schema_200_requests_all_validate(server):
    client = server.async_openai()
    salt = uuid.uuid4().hex

    async def one(i: int, gate: asyncio.Semaphore):
        schema = SCHEMAS[i % len(SCHEMAS)]
        async with gate:
            r = await client.chat.completions.create(
                model="embedded", max_tokens=40, temperature=1.0, seed=i,
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                response_format={"type": "json_schema",
                                 "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema, "strict": True}},
                extra_body={"cache_salt": salt},
            )
        return schema, r.choices[0]

    async def run():
        gate = asyncio.Semaphore(32)
        return await asyncio.gather(*(one(i, gate) for i in range(200)))

    results = asyncio.run(run())
    assert len(results) == 200
    for schema, choice in results:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_partial_output_on_length(server):
    client = server.openai()
    r = client.chat.completions.create(model="embedded", max_tokens=48, temperature=0,
                                       messages=[{"role": "user", "content": "Describe a cat."}],
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # a grammar that cannot finish within max_tokens: "length" and the partial output, no hang
    r = client.chat.completions.create(model="embedded", max_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": "Describe a cat."}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "long", "schema": {"type": "object", "properties": {
                                               "essay": {"type": "string", "minLength": 200}}, "required": ["essay"]}}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    assert r.usage.completion_tokens == 3


def test_chat_logprobs_streaming_and_not(server):
    client = server.openai()
    kw = dict(model="embedded", max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
              messages=[{"role": "user", "content": "Count: one, two,"}])
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert bytes(t.bytes).decode() == t.token
    streamed = [lp for chunk in client.chat.completions.create(stream=True, **kw)
                if chunk.choices and chunk.choices[0].logprobs for lp in chunk.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_completion_logprobs_and_echo(server):
    client = server.openai()
    r = client.completions.create(model="embedded", prompt="def add(a, b):", max_tokens=4, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) >= 1 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    r = client.completions.create(model="embedded", prompt="def add(a, b):", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("def add(a, b):")

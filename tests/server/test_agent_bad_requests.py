"""Bad agent-API input: a 4xx in each API's own error shape, naming the parameter."""

from __future__ import annotations

import pytest

from tests.server.test_bad_requests import CHAT, MSG, USER, _anthropic_error, _openai_error

FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("extra, param, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minLength": "three"}}}},
     "response_format.json_schema.schema", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     "response_format.json_schema.name", "field required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "a string"}}]},
     "tools.0.function.parameters", "JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters", "type 'object'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "required": "city"}}}]},
     "tools.0.function.parameters", "invalid JSON schema"),
    ({"tools": [FN, FN]}, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "tool name"),
    ({"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": [FN], "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages.1.tool_call_id", "'call_9'"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "call_2", "content": "x"}]},
     "messages.2.tool_call_id", "'call_2'"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "not valid JSON"),
    ({"n": 17}, "n", "between 1 and 16"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "between 0 and 20"),
    ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
])
def test_openai_agent_bad_input(server, extra, param, needle):
    with server.http() as http:
        r = http.post(CHAT, json={"model": "embedded", "messages": USER, "max_tokens": 2, **extra})
    err = _openai_error(r, 400)
    assert err["param"] == param and needle in err["message"], err


@pytest.mark.parametrize("extra, needle", [
    ({"logprobs": 6}, "logprobs must be between 0 and 5"),
    ({"logprobs": 1, "echo": True}, "echo together with logprobs"),
])
def test_completions_bad_input(server, extra, needle):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": "embedded", "prompt": "x", "max_tokens": 2, **extra})
    assert needle in _openai_error(r, 400)["message"]


TOOL = {"name": "f", "input_schema": {"type": "object", "properties": {}}}


@pytest.mark.parametrize("extra, needle", [
    ({"tools": [{"name": "f", "input_schema": ["not", "a", "schema"]}]}, "tools.0.input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": 7}}}}]},
     "tools.0.input_schema: invalid JSON schema"),
    ({"tools": [{"name": "f"}]}, "tools.0.input_schema: field required"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "g"}}, "tool_choice.name: 'g'"),
    ({"tools": [TOOL], "tool_choice": {"type": "maybe"}}, "tool_choice.type"),
    ({"tools": [TOOL], "messages": USER + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "x"}]}]},
     "messages.2.content.0.tool_use_id: 'toolu_2'"),
    ({"tools": [{**TOOL, "cache_control": {"type": "forever"}}]}, "tools.0.cache_control.type"),
])
def test_anthropic_agent_bad_input(server, extra, needle):
    with server.http() as http:
        r = http.post(MSG, json={"model": "embedded", "max_tokens": 2, "messages": USER, **extra})
    assert needle in _anthropic_error(r, 400, "invalid_request_error")

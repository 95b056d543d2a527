"""Tool calling end to end with the official clients: call -> tool result -> final answer, on
both APIs, streaming and not. The first turn forces a call (tool_choice required / any), which
constrains decoding to the tool's schema, so even the 135M embedded model emits a call that
parses; the final turn is free (tool_choice auto)."""

from __future__ import annotations

import json
import uuid

import pytest

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
CLOCK = {
    "name": "get_time",
    "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"],
                   "additionalProperties": False},
}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
ANTHROPIC_TOOLS = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                   for t in (WEATHER, CLOCK)]
RESULT = json.dumps({"temperature": 18, "sky": "sunny"})


def _openai_turn(client, messages, stream: bool, **kw):
    """One chat turn; returns (content, tool_calls as dicts, finish_reason)."""
    args = dict(model="embedded", messages=messages, tools=OPENAI_TOOLS, max_tokens=48, temperature=0, **kw)
    if not stream:
        r = client.chat.completions.create(**args)
        choice = r.choices[0]
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] = tc.id or call["id"]
            if tc.function is not None:
                call["function"]["name"] += tc.function.name or ""
                call["function"]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_tool_loop(server, stream):
    client = server.openai()
    messages = [{"role": "system", "content": f"You answer weather questions. ({uuid.uuid4().hex})"},
                {"role": "user", "content": "What is the weather in Paris right now?"}]
    content, calls, finish = _openai_turn(client, messages, stream, tool_choice="required")
    assert finish == "tool_calls"
    assert len(calls) >= 1 and calls[0]["id"]
    name = calls[0]["function"]["name"]
    arguments = json.loads(calls[0]["function"]["arguments"])
    assert name in ("get_weather", "get_time") and isinstance(arguments["city"], str)
    if name == "get_weather":
        assert arguments["unit"] in ("celsius", "fahrenheit")

    messages.append({"role": "assistant", "content": content, "tool_calls": calls})
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": RESULT})
    content, calls, finish = _openai_turn(client, messages, stream, tool_choice="auto")
    assert finish in ("stop", "length") and not calls
    assert content


def test_openai_named_tool_choice_and_none(server):
    client = server.openai()
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    content, calls, finish = _openai_turn(client, messages, False,
                                          tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert finish == "tool_calls" and [c["function"]["name"] for c in calls] == ["get_time"]
    assert set(json.loads(calls[0]["function"]["arguments"])) >= {"city"}
    content, calls, finish = _openai_turn(client, messages, False, tool_choice="none")
    assert not calls and content


def _anthropic_turn(client, messages, stream: bool, **kw):
    args = dict(model="embedded", messages=messages, tools=ANTHROPIC_TOOLS, max_tokens=48, extra_body={"temperature": 0},
                system="You answer weather questions.", **kw)
    if stream:
        with client.messages.stream(**args) as s:
            kinds = [event.type for event in s]
            message = s.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        if any(b.type == "tool_use" for b in message.content):
            assert "input_json" in kinds  # the SDK's event for input_json_delta
        return message
    return client.messages.create(**args)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_anthropic_tool_loop(server, stream):
    client = server.anthropic()
    messages = [{"role": "user", "content": f"What is the weather in Lisbon? ({uuid.uuid4().hex[:8]})"}]
    first = _anthropic_turn(client, messages, stream, tool_choice={"type": "any"})
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and uses[0].id.startswith("toolu_") and uses[0].name in ("get_weather", "get_time")
    assert isinstance(uses[0].input["city"], str)

    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": u.id, "content": RESULT} for u in uses
    ]})
    final = _anthropic_turn(client, messages, stream, tool_choice={"type": "auto"})
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in final.content] == ["text"] and final.content[0].text


def test_anthropic_named_tool(server):
    client = server.anthropic()
    r = client.messages.create(model="embedded", max_tokens=48, extra_body={"temperature": 0}, tools=ANTHROPIC_TOOLS,
                               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                               messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert [b.type for b in r.content] == ["tool_use"] and r.content[0].name == "get_weather"
    assert set(r.content[0].input) == {"city", "unit"}


def test_anthropic_tools_are_part_of_the_cached_prefix(server):
    """cache_control on the last tool pins the tool list; a request with another system prompt
    and question still reads the tools from the cache (tools render first)."""
    client = server.anthropic()
    salt = uuid.uuid4().hex
    padded = [dict(t, description=t["description"] + " " + "Use it whenever the user asks about it. " * 12)
              for t in ANTHROPIC_TOOLS]
    padded[-1] = dict(padded[-1], cache_control={"type": "ephemeral"})
    first = client.messages.create(model="embedded", max_tokens=2, tools=padded, system="Be brief.",
                                   messages=[{"role": "user", "content": "Hi"}], extra_body={"cache_salt": salt})
    assert first.usage.cache_creation_input_tokens > 0
    second = client.messages.create(model="embedded", max_tokens=2, tools=padded, system="Be verbose and kind.",
                                    messages=[{"role": "user", "content": "Hello there"}],
                                    extra_body={"cache_salt": salt})
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens - server.state.block_size


def test_fallback_rendering_puts_tools_before_system(server):
    from radixserve.server.prompting import ChatTurn, render
    from radixserve.server.tools import ToolSpec

    tools = [ToolSpec("get_weather", "d", WEATHER["parameters"])]
    text = render(server.tokenizer, [ChatTurn("system", ["SYSTEM TEXT"]), ChatTurn("user", ["HELLO"])], tools=tools)
    assert text.index("<tools>") < text.index("SYSTEM TEXT") < text.index("HELLO")
    assert "You are a helpful AI assistant named SmolLM" not in text

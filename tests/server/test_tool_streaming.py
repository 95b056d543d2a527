"""Streamed tool calls arrive as the model writes them: the name first, then the arguments in
several pieces that reassemble to exactly what the non-streamed response holds (both APIs,
the official clients against a real server). A forced tool choice at temperature 0 makes the
streamed and the whole response the same generation."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.server.test_tools import ANTHROPIC_TOOLS, OPENAI_TOOLS


def test_openai_tool_call_arguments_stream_in_pieces(server):
    client = server.openai()
    args = dict(model="embedded", tools=OPENAI_TOOLS, max_tokens=48, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                messages=[{"role": "user", "content": f"Weather in Paris? ({uuid.uuid4().hex[:8]})"}])
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    assert len(whole) == 1

    name_seen_at, argument_deltas, arguments, call_id, finish = None, [], "", None, None
    for i, chunk in enumerate(client.chat.completions.create(stream=True, **args)):
        delta = chunk.choices[0].delta if chunk.choices else None
        for tc in (delta.tool_calls or []) if delta is not None else []:
            assert tc.index == 0
            if tc.function.name:
                name_seen_at, call_id = i, tc.id
                assert tc.function.name == "get_weather"
            if tc.function.arguments:
                assert name_seen_at is not None, "arguments before the name"
                argument_deltas.append(tc.function.arguments)
                arguments += tc.function.arguments
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and call_id
    assert len(argument_deltas) > 1, argument_deltas  # streamed as produced, not whole at the end
    assert arguments == whole[0].function.arguments  # the same text, piece by piece
    assert set(json.loads(arguments)) == {"city", "unit"}


@pytest.mark.slow
def test_anthropic_input_json_streams_in_pieces(server):
    client = server.anthropic()
    args = dict(model="embedded", max_tokens=48, extra_body={"temperature": 0}, tools=ANTHROPIC_TOOLS,
                tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                messages=[{"role": "user", "content": f"Weather in Oslo? ({uuid.uuid4().hex[:8]})"}])
    whole = client.messages.create(**args)
    assert [b.type for b in whole.content] == ["tool_use"]

    partials, started = [], None
    for event in client.messages.create(stream=True, **args):
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            started = event.content_block
            assert event.content_block.name == "get_weather"
        elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            assert started is not None, "input before the tool_use block started"
            partials.append(event.delta.partial_json)
        elif event.type == "message_delta":
            assert event.delta.stop_reason == "tool_use"
    assert len(partials) > 1, partials
    assert json.loads("".join(partials)) == whole.content[0].input
    assert started.id.startswith("toolu_")

"""Parsing tool calls out of model output: Hermes/Qwen <tool_call> tags and Llama 3 JSON."""

from __future__ import annotations

import json

from radixserve.server.tools import ToolCallStreamer, parse_tool_calls

NAMES = {"get_weather", "get_time"}


def test_hermes_calls_with_leading_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"city": "Rome"}}</tool_call>')
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]
    assert calls[0].id != calls[1].id


def test_llama3_json_calls():
    content, calls = parse_tool_calls('{"name": "get_time", "parameters": {"city": "Oslo"}}', NAMES)
    assert content is None and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    _, calls = parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"city": "A"}}; '
                                '{"name": "get_weather", "parameters": {"city": "B"}}', NAMES)
    assert [c.name for c in calls] == ["get_time", "get_weather"]


def test_unknown_tools_and_plain_json_stay_text():
    for text in ['{"name": "launch_rocket", "arguments": {}}', '{"answer": 42}', "plain words",
                 '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>{broken"]:
        assert parse_tool_calls(text, NAMES) == (text, [])


def test_streamer_sends_text_until_a_call_starts():
    streamer = ToolCallStreamer()
    pieces = ["Sure", ", one moment. <tool", '_call>\n{"name": "get_time", ', '"arguments": {"city": "X"}}\n</tool_call>']
    sent = "".join(streamer.feed(p) for p in pieces)
    assert sent == "Sure, one moment. "
    rest, calls = streamer.finish(NAMES)
    assert rest == "" and [c.name for c in calls] == ["get_time"]


def test_streamer_releases_held_text_when_no_call_follows():
    streamer = ToolCallStreamer()
    sent = streamer.feed("a < b and ") + streamer.feed("{x} <tool")
    rest, calls = streamer.finish(NAMES)
    assert not calls and sent + rest == "a < b and {x} <tool"

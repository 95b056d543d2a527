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


def _replay(pieces: list[str]):
    """Feed a streamer the pieces; returns (content, {index: (id, name, arguments)}, how many
    argument deltas arrived, the finished calls)."""
    from radixserve.server.tools import ArgumentsDelta, CallStart, TextDelta

    streamer = ToolCallStreamer(NAMES)
    events = [e for p in pieces for e in streamer.feed(p)]
    tail, calls = streamer.finish()
    content, streamed, deltas = "", {}, 0
    for e in events + tail:
        if isinstance(e, TextDelta):
            assert not streamed, "content after a call started"
            content += e.text
        elif isinstance(e, CallStart):
            assert e.index not in streamed, "a call started twice"
            streamed[e.index] = [e.id, e.name, ""]
        elif isinstance(e, ArgumentsDelta):
            streamed[e.index][2] += e.text
            deltas += 1
    return content, streamed, deltas, calls, events


def test_streamer_sends_text_until_a_call_starts():
    pieces = ["Sure", ", one moment. <tool", '_call>\n{"name": "get_time", ', '"arguments": {"city": "X"}}\n</tool_call>']
    content, streamed, _, calls, _ = _replay(pieces)
    assert content == "Sure, one moment. "
    assert [c.name for c in calls] == ["get_time"]
    assert streamed == {0: [calls[0].id, "get_time", '{"city": "X"}']}


def test_streamer_releases_held_text_when_no_call_follows():
    content, streamed, _, calls, _ = _replay(["a < b and ", "{x} <tool"])
    assert not calls and not streamed and content == "a < b and {x} <tool"


def test_hermes_arguments_stream_in_pieces_and_reassemble_exactly():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\\"is", "days": [1, {"a": "}"}]}}\n'
            '</tool_call>\n<tool_call>{"name":"get_time","arguments":{"city":"Rome"}}</tool_call>')
    _, whole = parse_tool_calls(text, NAMES)
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]  # a few characters per token
    content, streamed, deltas, calls, events = _replay(pieces)
    assert content == ""
    assert deltas > 4
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole]
    assert {i: (name, args) for i, (_, name, args) in streamed.items()} == {
        i: (c.name, c.arguments) for i, c in enumerate(whole)}
    assert json.loads(streamed[0][2]) == {"city": 'Par"is', "days": [1, {"a": "}"}]}
    assert [streamed[i][0] for i in range(2)] == [c.id for c in calls]
    # the name comes before any argument text, and arguments arrive before the output ends
    from radixserve.server.tools import ArgumentsDelta, CallStart
    first_args = next(i for i, e in enumerate(events) if isinstance(e, ArgumentsDelta))
    assert isinstance(events[0], CallStart) and first_args > 0


def test_calls_that_cannot_stream_arrive_whole_at_the_end():
    for text in ['<tool_call>{"arguments": {"city": "A"}, "name": "get_time"}</tool_call>',  # name last
                 '<tool_call>{"name": "get_time", "arguments": "{\\"city\\": \\"A\\"}"}</tool_call>',  # double-encoded
                 '{"name": "get_time", "parameters": {"city": "A"}}']:  # Llama 3 JSON
        _, whole = parse_tool_calls(text, NAMES)
        content, streamed, deltas, calls, events = _replay([text[i:i + 4] for i in range(0, len(text), 4)])
        from radixserve.server.tools import ArgumentsDelta
        # no argument text during the stream (the name may come first), all of it at the end
        assert not any(isinstance(e, ArgumentsDelta) for e in events) and deltas == 1, text
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"city": "A"})]
        assert streamed[0][1:] == [whole[0].name, whole[0].arguments]


def test_unknown_tool_in_tags_stays_text_when_streamed():
    text = '<tool_call>{"name": "nope", "arguments": {"x": 1}}</tool_call>'
    content, streamed, _, calls, _ = _replay([text[i:i + 5] for i in range(0, len(text), 5)])
    assert content == text and not streamed and not calls

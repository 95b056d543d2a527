"""Anthropic-compatible routes: POST /v1/messages (and /v1/messages/count_tokens).

Usage, from the engine's real counts: cache_read_input_tokens is RequestOutput.num_cached_tokens
(prompt tokens read from the prefix cache, explicit breakpoint or not); cache_creation_input_tokens
are the tokens up to the last breakpoint that were not read, i.e. newly written and pinned, split
per TTL in `cache_creation` (a token covered by a 1h and a 5m breakpoint lives 1h); input_tokens
is the rest, so input + read + creation = the prompt's length.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixserve.request import CachePin, RequestOutput
from radixserve.sampling import SamplingParams
from radixserve.server.anthropic_protocol import (
    TTL_SECONDS,
    Conversation,
    CountTokensRequest,
    MessagesRequest,
    build_conversation,
)
from radixserve.server.async_engine import EngineDeadError, RequestStream
from radixserve.server.errors import error_body
from radixserve.server.preamble import parse_request, resolve_named_cache
from radixserve.server.prompting import ChatPrompt, build_prompt, prefix_token_count
from radixserve.server.state import ServerState, collect, turn_texts
from radixserve.server.tools import (
    ArgumentsDelta,
    CallStart,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallStreamer,
    call_style,
    parse_tool_calls,
    tool_call_grammar,
)

router = APIRouter()


@dataclass(slots=True)
class _LabelledPin:
    num_tokens: int
    ttl: str  # "5m" | "1h"


@router.post("/v1/messages")
async def create_message(request: Request):
    parsed = await parse_request(request, MessagesRequest)
    state, data, body = parsed.state, parsed.data, parsed.body
    cache, namespace = await resolve_named_cache(state, parsed.tenant, body.cached_content, body.cache_salt,
                                                 parsed.cache_policy)
    conversation = build_conversation(body, cache.turns if cache is not None else None)
    state.check_prompt_size(turn_texts(conversation.turns))
    prompt, pins = await asyncio.to_thread(_prompt_and_pins, state, conversation)  # CPU-heavy: off the loop
    tools, choice = conversation.tools, conversation.tool_choice
    engine_pins = [CachePin(p.num_tokens, TTL_SECONDS[p.ttl] * state.config.cache_ttl_scale) for p in pins]
    if cache is not None and (pin := state.caches.request_pin(cache, prompt)) is not None:
        engine_pins.append(pin)
    params = SamplingParams(
        max_tokens=body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        stop=list(body.stop_sequences or []),
    )
    if choice.forced:
        params.guided = tool_call_grammar(tools, choice, call_style(state.tokenizer))
    state.log_request("messages", data, namespace)
    stream = await state.submit(prompt.token_ids, params, prefix="msg_", namespace=namespace, cache_pins=engine_pins,
                                cache_policy=parsed.cache_policy, cache_report=parsed.cache_report,
                                readable_namespaces=parsed.readable_namespaces(body.cache_salt))
    if not state.prefix_caching or not parsed.cache_policy.writes:
        pins = []  # nothing gets written to a cache that is off, or by a request that may not write
    tool_names = {t.name for t in tools} if choice.mode != "none" else set()
    if body.stream:
        events = _message_events(stream, state.model_name, pins, request.url.path, tool_names,
                                 state.cache_report_json)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    out = await collect(stream, request)
    accepted = _accepted(pins, out)
    headers = None
    if len(accepted) < len(pins):  # over the pin bounds: said here and in usage (no cache creation)
        headers = {"radixserve-cache-pins-refused": f"{len(pins) - len(accepted)} of {len(pins)} cache_control "
                                                    f"breakpoints were not pinned: {state.pin_bounds_text()}"}
    content, calls = parse_tool_calls(out.text, tool_names) if tool_names else (out.text, [])
    blocks: list[dict] = [{"type": "text", "text": content}] if content or not calls else []
    blocks += [_tool_use_block(call) for call in calls]
    return JSONResponse(headers=headers, content={
        "id": out.request_id,
        "type": "message",
        "role": "assistant",
        "model": state.model_name,
        "content": blocks,
        "stop_reason": "tool_use" if calls else _stop_reason(out),
        "stop_sequence": out.stop_reason if isinstance(out.stop_reason, str) else None,
        "usage": _usage(out, accepted, report=state.cache_report_json(out)),
    })


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> JSONResponse:
    parsed = await parse_request(request, CountTokensRequest)
    state, tenant, body = parsed.state, parsed.tenant, parsed.body
    cache = await state.caches.get(tenant.owner, body.cached_content) if body.cached_content else None
    conversation = build_conversation(body, cache.turns if cache is not None else None)
    state.check_prompt_size(turn_texts(conversation.turns))
    prompt = await asyncio.to_thread(build_prompt, state.tokenizer, conversation.prompt_turns,
                                     conversation.assistant_prefill, tools=conversation.tools)
    return JSONResponse({"input_tokens": len(prompt.token_ids)})


def _prompt_and_pins(state: ServerState, conversation: Conversation) -> tuple[ChatPrompt, list[_LabelledPin]]:
    prompt = build_prompt(state.tokenizer, conversation.prompt_turns, conversation.assistant_prefill,
                          tools=conversation.tools)
    state.check_prompt_tokens(len(prompt.token_ids))  # before rendering once per breakpoint
    return prompt, _breakpoint_pins(state, conversation, prompt)


def _breakpoint_pins(state: ServerState, conversation: Conversation, prompt: ChatPrompt) -> list[_LabelledPin]:
    """Each breakpoint's prefix in prompt tokens, whole blocks only (the tree caches whole
    blocks), dropping those under the minimum cacheable length."""
    pins = []
    for b in conversation.breakpoints:
        n = prefix_token_count(state.tokenizer, prompt, conversation.turns, b.turn_index, b.block_index,
                               tools=conversation.tools)
        if n < state.config.min_cacheable_tokens:
            continue
        n -= n % state.block_size
        if n > 0:
            pins.append(_LabelledPin(n, b.ttl))
    return pins


def _accepted(pins: list[_LabelledPin], out: RequestOutput) -> list[_LabelledPin]:
    """The breakpoints the engine pinned: a pin over the pin bounds is refused (and a refused
    breakpoint writes nothing to the cache, so it counts as plain input)."""
    return [p for p in pins if p.num_tokens <= out.num_pinned_tokens]


def creation_by_ttl(pins: list[_LabelledPin], cached: int) -> dict[str, int]:
    """Tokens written by this request's breakpoints (those past the cached prefix), per TTL."""
    written = {"5m": 0, "1h": 0}
    ends = sorted({p.num_tokens for p in pins if p.num_tokens > cached})
    start = cached
    for end in ends:
        covering = {p.ttl for p in pins if p.num_tokens >= end}
        written["1h" if "1h" in covering else "5m"] += end - start
        start = end
    return written


def _usage(out: RequestOutput, pins: list[_LabelledPin], output_tokens: int | None = None,
           report: dict | None = None) -> dict:
    written = creation_by_ttl(pins, out.num_cached_tokens)
    creation = written["5m"] + written["1h"]
    usage = {
        "input_tokens": out.num_prompt_tokens - out.num_cached_tokens - creation,
        "output_tokens": len(out.token_ids) if output_tokens is None else output_tokens,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": out.num_cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": written["5m"], "ephemeral_1h_input_tokens": written["1h"]},
    }
    if out.cached_tokens_by_tier is not None:  # extension field (tiers on): where the read tokens came from
        usage["cache_read_input_tokens_by_tier"] = dict(out.cached_tokens_by_tier)
    if report is not None:  # an extension, only when asked: standard clients see standard fields
        usage["cache_report"] = report
    return usage


def _stop_reason(out: RequestOutput) -> str:
    if out.finish_reason == "length":
        return "max_tokens"
    if isinstance(out.stop_reason, str):
        return "stop_sequence"
    return "end_turn"


def _tool_use_block(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": _tool_use_id(call), "name": call.name, "input": call.input()}


def _tool_use_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_")


async def _message_events(
    stream: RequestStream, model: str, pins: list[_LabelledPin], path: str, tool_names: set[str] = frozenset(),
    report_of: Callable[[RequestOutput], dict | None] = lambda out: None,
) -> AsyncIterator[str]:
    """Anthropic's event stream. With tools, the text block opens only once there is text (an
    output that is only a call has none), and each call is a tool_use block that opens once the
    model wrote the tool's name, its input arriving as input_json_delta events as the model
    writes the arguments."""
    streamer = ToolCallStreamer(tool_names) if tool_names else None
    index = 0  # the content block being written
    open_block: str | None = None  # "text" | "tool_use" | None
    calls: list[ToolCall] = []

    def close_block() -> list[str]:
        nonlocal index, open_block
        if open_block is None:
            return []
        event = _event("content_block_stop", {"type": "content_block_stop", "index": index})
        index, open_block = index + 1, None
        return [event]

    def blocks(events: list[StreamEvent]) -> list[str]:
        nonlocal open_block
        out: list[str] = []
        for e in events:
            if isinstance(e, TextDelta):
                if open_block != "text":
                    out += close_block()
                    open_block = "text"
                    out.append(_event("content_block_start", {
                        "type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""},
                    }))
                if e.text:
                    out.append(_event("content_block_delta", {
                        "type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": e.text},
                    }))
            elif isinstance(e, CallStart):
                out += close_block()
                open_block = "tool_use"
                call_id = _tool_use_id(ToolCall(e.id, e.name, ""))
                out.append(_event("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": call_id, "name": e.name, "input": {}},
                }))
            elif isinstance(e, ArgumentsDelta):
                out.append(_event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": e.text},
                }))
        return out

    try:
        # message_start carries the input usage, known once the engine admitted the request:
        # wait for the first output before sending anything
        first = await stream.next()
        pins = _accepted(pins, first)  # pins are applied (or refused) with the first token
        yield _event("message_start", {
            "type": "message_start",
            "message": {
                "id": stream.request_id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": _usage(first, pins, output_tokens=1),
            },
        })
        if streamer is None:
            for event in blocks([TextDelta("")]):
                yield event
        yield _event("ping", {"type": "ping"})
        out = first
        while True:
            events = streamer.feed(out.new_text) if streamer is not None else [TextDelta(out.new_text)]
            for event in blocks([e for e in events if not isinstance(e, TextDelta) or e.text]):
                yield event
            if out.finished:
                break
            out = await stream.next()
        if streamer is not None:
            rest, calls = streamer.finish()
            if not rest and index == 0 and open_block is None:
                rest = [TextDelta("")]  # nothing at all: an empty text block, as before
            for event in blocks(rest):
                yield event
        for event in close_block():
            yield event
        yield _event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use" if calls else _stop_reason(out),
                      "stop_sequence": out.stop_reason if isinstance(out.stop_reason, str) else None},
            "usage": _usage(out, pins, report=report_of(out)),
        })
        yield _event("message_stop", {"type": "message_stop"})
    except EngineDeadError as e:
        yield _event("error", error_body(path, e.status, str(e)))
    finally:
        stream.close()


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

usage.prompt_tokens_details.cached_tokens is the engine's own count of prompt tokens read from
the prefix cache (RequestOutput.num_cached_tokens), not an estimate.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from radixserve.model.tokenizer import bytes_to_unicode
from radixserve.request import RequestOutput
from radixserve.server.async_engine import EngineDeadError, RequestStream, merge_streams
from radixserve.server.errors import APIError, error_body
from radixserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from radixserve.server.preamble import parse_request, resolve_named_cache
from radixserve.server.prompting import build_prompt
from radixserve.server.state import ServerState, collect_all, get_state, turn_texts
from radixserve.server.tools import (
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

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- models -----------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    state.auth.authenticate(request)
    if "anthropic-version" in request.headers:  # the Anthropic SDK's models.list()
        entry = _anthropic_model(state)
        return JSONResponse({"data": [entry], "has_more": False, "first_id": entry["id"], "last_id": entry["id"]})
    return JSONResponse({"object": "list", "data": [_openai_model(state)]})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    state.auth.authenticate(request)
    state.check_model(model_id)
    if "anthropic-version" in request.headers:
        return JSONResponse(_anthropic_model(state))
    return JSONResponse(_openai_model(state))


def _openai_model(state: ServerState) -> dict:
    return {
        "id": state.model_name, "object": "model", "created": state.created, "owned_by": "radixserve",
        "max_model_len": state.engine_info.max_model_len,
    }


def _anthropic_model(state: ServerState) -> dict:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.created))
    return {"type": "model", "id": state.model_name, "display_name": state.model_name, "created_at": created}


# ---- chat -------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    parsed = await parse_request(request, ChatCompletionRequest)
    state, data, body = parsed.state, parsed.data, parsed.body
    body.check_supported()
    tools = body.tool_specs()
    choice = body.tool_choice_spec(tools)
    guided = body.guided_spec()
    if choice.forced:
        if guided is not None:
            raise APIError(400, "response_format cannot be combined with a required or named tool_choice",
                           param="response_format")
        guided = tool_call_grammar(tools, choice, call_style(state.tokenizer))

    turns = body.turns()
    state.check_prompt_size(turn_texts(turns))
    cache, namespace = await resolve_named_cache(state, parsed.tenant, body.cached_content, body.cache_salt,
                                                 parsed.cache_policy)
    if cache is not None:
        if any(t.role == "system" for t in turns):
            raise APIError(400, "a request naming a cached_content takes its system instruction from the cache; "
                                "remove the system message", param="messages")
        turns = cache.turns + turns
    prompt = await asyncio.to_thread(build_prompt, state.tokenizer, turns, tools=tools)  # CPU-heavy: off the event loop
    pins = []
    if cache is not None and (pin := state.caches.request_pin(cache, prompt)) is not None:
        pins.append(pin)
    limit = body.max_tokens_limit
    params = body.sampling_params(limit if limit is not None else state.default_max_tokens(len(prompt.token_ids)))
    params.guided = guided
    params.logprobs = body.num_logprobs()
    state.log_request("chat", data, namespace)
    streams = await state.submit_choices(prompt.token_ids, params, prefix="chatcmpl-", namespace=namespace,
                                         cache_pins=pins, cache_policy=parsed.cache_policy, cache_report=parsed.cache_report,
                                         readable_namespaces=parsed.readable_namespaces(body.cache_salt))
    created = int(time.time())
    tool_names = {t.name for t in tools} if choice.mode != "none" else set()
    if body.stream:
        events = _chat_events(streams, state, created, body.include_usage, request.url.path, tool_names)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    outs = await collect_all(streams, request)
    return JSONResponse({
        "id": streams[0].request_id,
        "object": "chat.completion",
        "created": created,
        "model": state.model_name,
        "choices": [_chat_choice(state, out, tool_names) for out in outs],
        "usage": _usage(outs, state),
        "system_fingerprint": None,
    })


def _chat_choice(state: ServerState, out: RequestOutput, tool_names: set[str]) -> dict:
    content, calls = parse_tool_calls(out.text, tool_names) if tool_names else (out.text, [])
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.openai_dict() for c in calls]
    return {
        "index": out.index,
        "message": message,
        "logprobs": _chat_logprobs(state, out.logprobs, out) if out.logprobs is not None else None,
        "finish_reason": "tool_calls" if calls else _finish_reason(out),
    }


async def _chat_events(
    streams: list[RequestStream], state: ServerState, created: int, include_usage: bool, path: str,
    tool_names: set[str],
) -> AsyncIterator[str]:
    """The chat chunk stream of one request's choices (n > 1: interleaved, each chunk naming its
    choice `index`). Tool calls stream as they are written: the name first, then the arguments
    in pieces."""
    model, request_id = state.model_name, streams[0].request_id

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return _stream_chunk(request_id, "chat.completion.chunk", created, model, [choice], include_usage)

    def deltas(events: list[StreamEvent]) -> list[dict]:
        out = []
        for event in events:
            if isinstance(event, TextDelta):
                out.append({"content": event.text})
            elif isinstance(event, CallStart):
                out.append({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                            "function": {"name": event.name, "arguments": ""}}]})
            else:
                out.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
        return out

    streamers = [ToolCallStreamer(tool_names) for _ in streams] if tool_names else None
    finals: list[RequestOutput] = []
    try:
        for index in range(len(streams)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, out in merge_streams(streams):
            logprobs = None
            if out.new_logprobs:
                logprobs = _chat_logprobs(state, out.new_logprobs, out if out.finished else None)
            if streamers is None:
                events: list[StreamEvent] = [TextDelta(out.new_text)] if out.new_text else []
            else:
                events = streamers[index].feed(out.new_text)
            pieces = deltas(events)
            if logprobs and logprobs["content"]:  # with the first piece of content, or alone
                if not pieces or "content" not in pieces[0]:
                    pieces.insert(0, {"content": ""})
                yield chunk(index, pieces.pop(0), logprobs=logprobs)
            for delta in pieces:
                yield chunk(index, delta)
            if out.finished:
                calls: list[ToolCall] = []
                if streamers is not None:
                    rest, calls = streamers[index].finish()
                    for delta in deltas(rest):
                        yield chunk(index, delta)
                yield chunk(index, {}, "tool_calls" if calls else _finish_reason(out))
                finals.append(out)
        if include_usage:
            yield _stream_chunk(request_id, "chat.completion.chunk", created, model, [], True, _usage(finals, state))
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        yield _sse(error_body(path, e.status, str(e)))
    finally:
        for stream in streams:
            stream.close()  # no-op when finished; aborts when the client went away mid-stream


def _chat_logprobs(state: ServerState, logprobs: list, final: RequestOutput | None) -> dict:
    """OpenAI's chat logprobs object; `final` (the finished output) drops a stop token's entry."""
    logprobs = _drop_stop_token(logprobs, final)
    tok = state.tokenizer

    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(tok, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(raw)}

    return {
        "content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                    for lp in logprobs],
        "refusal": None,
    }


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (byte-level BPE spelling undone; special tokens as text)."""
    piece = tokenizer.id_to_token(token_id) or ""
    if tokenizer.is_special(token_id):
        return piece.encode("utf-8")
    if all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}  # a constant table


def _finite(x: float) -> float:
    return x if x > -1e30 else -9999.0  # JSON has no -inf; OpenAI reports -9999 for impossible tokens


# ---- completions ------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request):
    parsed = await parse_request(request, CompletionRequest)
    state, data, body = parsed.state, parsed.data, parsed.body
    body.check_supported()
    namespace = parsed.tenant.namespace(body.cache_salt)

    raw = body.prompts()
    if len(raw) > 1:
        state.charge_probes(parsed.tenant, parsed.cache_policy, len(raw) - 1)  # parse_request charged one
    texts = [p for p in raw if isinstance(p, str)]
    state.check_prompt_size(texts)
    # The whole prompt is the client's text: special-token spellings in it are control tokens
    # (as in vLLM); only chat routes keep them out of message content.
    encoded = iter(await asyncio.to_thread(state.tokenizer.encode_batch, texts) if texts else [])
    prompts = [next(encoded) if isinstance(p, str) else p for p in raw]
    echoes = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in raw] if body.echo else []
    state.log_request("completions", data, namespace)
    # choice index = prompt number * n + choice of that prompt, as OpenAI numbers them
    streams: list[RequestStream] = []
    try:
        for ids in prompts:
            max_tokens = body.max_tokens if body.max_tokens is not None else state.default_max_tokens(len(ids))
            params = body.sampling_params(max_tokens)
            params.logprobs = body.logprobs
            streams += await state.submit_choices(ids, params, prefix="cmpl-", namespace=namespace,
                                                  cache_policy=parsed.cache_policy, cache_report=parsed.cache_report,
                                                  readable_namespaces=parsed.readable_namespaces(body.cache_salt))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    echoes = [echo for echo in echoes for _ in range(body.n)]  # one per choice
    completion_id = streams[0].request_id
    created = int(time.time())
    if body.stream:
        events = _completion_events(streams, completion_id, state, created, body.include_usage,
                                    request.url.path, echoes)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    outs = await collect_all(streams, request)
    return JSONResponse({
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": state.model_name,
        "choices": [
            {"index": i, "text": (echoes[i] if echoes else "") + out.text,
             "logprobs": _completion_logprobs(state, out.logprobs, out) if out.logprobs is not None else None,
             "finish_reason": _finish_reason(out)}
            for i, out in enumerate(outs)
        ],
        "usage": _usage(outs, state),
        "system_fingerprint": None,
    })


async def _completion_events(
    streams: list[RequestStream], completion_id: str, state: ServerState, created: int, include_usage: bool,
    path: str, echoes: list[str],
) -> AsyncIterator[str]:
    model = state.model_name

    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return _stream_chunk(completion_id, "text_completion", created, model, [choice], include_usage)

    finals: list[RequestOutput] = []
    try:
        for index, echo in enumerate(echoes):
            yield chunk(index, echo)
        async for index, out in merge_streams(streams):
            logprobs = None
            if out.new_logprobs:
                logprobs = _completion_logprobs(state, out.new_logprobs, out if out.finished else None)
            if out.new_text or out.finished or logprobs:
                yield chunk(index, out.new_text, _finish_reason(out) if out.finished else None, logprobs)
            if out.finished:
                finals.append(out)
        if include_usage:
            yield _stream_chunk(completion_id, "text_completion", created, model, [], True, _usage(finals, state))
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        yield _sse(error_body(path, e.status, str(e)))
    finally:
        for stream in streams:
            stream.close()


def _drop_stop_token(logprobs: list, final: RequestOutput | None) -> list:
    """Without the stop token's entry (the last one) when a stop token ended the output: the
    text does not include it, so neither do the logprobs."""
    if final is not None and final.finish_reason == "stop" and isinstance(final.stop_reason, int) and logprobs:
        return logprobs[:-1]
    return logprobs


def _completion_logprobs(state: ServerState, logprobs: list, final: RequestOutput | None) -> dict:
    """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    logprobs = _drop_stop_token(logprobs, final)
    tok = state.tokenizer

    def text(token_id: int) -> str:
        return token_bytes(tok, token_id).decode("utf-8", errors="replace")

    tokens = [text(lp.token_id) for lp in logprobs]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [{text(t): _finite(v) for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


# ---- shared -----------------------------------------------------------------------------
def _usage(outs: list[RequestOutput], state: ServerState) -> dict:
    """Each prompt's tokens (and cached tokens) once, however many choices (n) share it: they
    were computed once; completion tokens over every choice."""
    firsts = [o for o in outs if o.index == 0]
    prompt = sum(o.num_prompt_tokens for o in firsts)
    completion = sum(len(o.token_ids) for o in outs)
    details: dict = {"cached_tokens": sum(o.num_cached_tokens for o in firsts)}
    by_tier = tier_breakdown(firsts)
    if by_tier is not None:  # extension field: which tier the cached tokens came from
        details["cached_tokens_by_tier"] = by_tier
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }
    reports = [r for o in firsts if (r := state.cache_report_json(o)) is not None]  # one per prompt
    if reports:  # an extension, only when asked: standard clients see standard fields
        usage["cache_report"] = reports[0] if len(firsts) == 1 else reports
    return usage


def tier_breakdown(outs: list[RequestOutput]) -> dict[str, int] | None:
    """Cached tokens per tier (device / host / storage) summed over outputs; None with the
    tiers off (then every cached token is a device hit and the field is left out)."""
    parts = [o.cached_tokens_by_tier for o in outs if o.cached_tokens_by_tier is not None]
    if not parts:
        return None
    return {tier: sum(p[tier] for p in parts) for tier in ("device", "host", "storage")}


def _finish_reason(out: RequestOutput) -> str:
    # "abort" only reaches a client that is already gone; OpenAI knows no such reason
    return "length" if out.finish_reason == "length" else "stop"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream_chunk(
    request_id: str, object_name: str, created: int, model: str, choices: list[dict], include_usage: bool,
    usage: dict | None = None,
) -> str:
    """One streamed chunk of a completion or chat completion, as an SSE event. With
    stream_options.include_usage, OpenAI's chunks carry "usage": null, and one last chunk with no
    choices carries the totals."""
    data = {"id": request_id, "object": object_name, "created": created, "model": model,
            "system_fingerprint": None, "choices": choices}
    if include_usage:
        data["usage"] = usage
    return _sse(data)

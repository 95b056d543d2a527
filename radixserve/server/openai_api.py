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

from radixserve.request import RequestOutput
from radixserve.server.async_engine import EngineDeadError, RequestStream, merge_streams
from radixserve.server.errors import APIError, error_body
from radixserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from radixserve.server.preamble import parse_request, resolve_named_cache
from radixserve.server.prompting import build_prompt
from radixserve.server.state import ServerState, collect, get_state, turn_texts

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
        "max_model_len": state.engine.max_model_len,
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

    turns = body.turns()
    state.check_prompt_size(turn_texts(turns))
    cache, namespace = await resolve_named_cache(state, parsed.tenant, body.cached_content, body.cache_salt,
                                                 parsed.cache_policy)
    if cache is not None:
        if any(t.role == "system" for t in turns):
            raise APIError(400, "a request naming a cached_content takes its system instruction from the cache; "
                                "remove the system message", param="messages")
        turns = cache.turns + turns
    prompt = await asyncio.to_thread(build_prompt, state.tokenizer, turns)  # CPU-heavy: off the event loop
    pins = []
    if cache is not None and (pin := state.caches.request_pin(cache, prompt)) is not None:
        pins.append(pin)
    limit = body.max_tokens_limit
    params = body.sampling_params(limit if limit is not None else state.default_max_tokens(len(prompt.token_ids)))
    state.log_request("chat", data, namespace)
    stream = await state.submit(prompt.token_ids, params, prefix="chatcmpl-", namespace=namespace, cache_pins=pins,
                                cache_policy=parsed.cache_policy)
    created = int(time.time())
    if body.stream:
        events = _chat_events(stream, state.model_name, created, body.include_usage, request.url.path)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    out = await collect(stream, request)
    return JSONResponse({
        "id": out.request_id,
        "object": "chat.completion",
        "created": created,
        "model": state.model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": None,
            "finish_reason": _finish_reason(out),
        }],
        "usage": _usage([out]),
        "system_fingerprint": None,
    })


async def _chat_events(
    stream: RequestStream, model: str, created: int, include_usage: bool, path: str
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        data = {
            "id": stream.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for out in stream:
            if out.new_text:
                yield chunk({"content": out.new_text})
            if out.finished:
                yield chunk({}, _finish_reason(out))
                if include_usage:
                    yield _sse({
                        "id": stream.request_id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "system_fingerprint": None, "choices": [], "usage": _usage([out]),
                    })
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        yield _sse(error_body(path, e.status, str(e)))
    finally:
        stream.close()  # no-op when finished; aborts when the client went away mid-stream


# ---- completions ------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request):
    parsed = await parse_request(request, CompletionRequest)
    state, data, body = parsed.state, parsed.data, parsed.body
    body.check_supported()
    namespace = parsed.tenant.namespace(body.cache_salt)

    raw = body.prompts()
    state.check_prompt_size([p for p in raw if isinstance(p, str)])
    # The whole prompt is the client's text: special-token spellings in it are control tokens
    # (as in vLLM); only chat routes keep them out of message content.
    texts = [p for p in raw if isinstance(p, str)]
    encoded = iter(await asyncio.to_thread(state.tokenizer.encode_batch, texts) if texts else [])
    prompts = [next(encoded) if isinstance(p, str) else p for p in raw]
    state.log_request("completions", data, namespace)
    streams: list[RequestStream] = []
    try:
        for ids in prompts:
            max_tokens = body.max_tokens if body.max_tokens is not None else state.default_max_tokens(len(ids))
            streams.append(await state.submit(ids, body.sampling_params(max_tokens), prefix="cmpl-", namespace=namespace,
                                              cache_policy=parsed.cache_policy))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    completion_id = streams[0].request_id
    created = int(time.time())
    if body.stream:
        events = _completion_events(streams, completion_id, state.model_name, created, body.include_usage,
                                    request.url.path)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    outs = []
    try:
        for stream in streams:
            outs.append(await collect(stream, request))
    finally:
        for stream in streams:
            stream.close()
    return JSONResponse({
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": state.model_name,
        "choices": [
            {"index": i, "text": out.text, "logprobs": None, "finish_reason": _finish_reason(out)}
            for i, out in enumerate(outs)
        ],
        "usage": _usage(outs),
        "system_fingerprint": None,
    })


async def _completion_events(
    streams: list[RequestStream], completion_id: str, model: str, created: int, include_usage: bool, path: str
) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
        data = {
            "id": completion_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    finals: list[RequestOutput] = []
    try:
        async for index, out in merge_streams(streams):
            if out.new_text or out.finished:
                yield chunk(index, out.new_text, _finish_reason(out) if out.finished else None)
            if out.finished:
                finals.append(out)
        if include_usage:
            yield _sse({
                "id": completion_id, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None, "choices": [], "usage": _usage(finals),
            })
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        yield _sse(error_body(path, e.status, str(e)))
    finally:
        for stream in streams:
            stream.close()


# ---- shared -----------------------------------------------------------------------------
def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(o.num_prompt_tokens for o in outs)
    completion = sum(len(o.token_ids) for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)},
    }


def _finish_reason(out: RequestOutput) -> str:
    # "abort" only reaches a client that is already gone; OpenAI knows no such reason
    return "length" if out.finish_reason == "length" else "stop"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

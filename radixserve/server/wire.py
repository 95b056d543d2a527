"""The engine process's wire format: msgspec Structs, MessagePack-encoded, one ZeroMQ frame each.

Server -> core (one PUSH/PULL channel, in order):
    AddRequest   a request's token ids, sampling and options; answered by a CallResult
    Abort        request ids to abort (fire and forget; each final output still comes back)
    Call         a named engine call (ENGINE_CALLS) with its arguments; answered by a CallResult
    ForgetOwner  a named cache is gone: its in-flight pins must not be applied
    Shutdown     finish: write the prefix cache down to the KV store and exit

Core -> server (a second PUSH/PULL channel):
    Outputs      every output of one step (or of aborts), as deltas: the new token ids, text and
                 logprobs of each request since its previous output, never the whole list; the
                 client keeps the prompt and the running totals (see EngineProcessClient)
    CallResult   the value of an AddRequest / Call, or the error it raised (type name + message)
    Failed       requests a failed step took down (each ends with an error, the others carry on)

Frames are decoded against these types, so a malformed frame fails loudly rather than
half-decoding. Dataclasses (SamplingParams, EngineSnapshot, ...) are encoded as maps by msgspec.
"""

from __future__ import annotations

from typing import Any

import msgspec

from radixserve.cache.cache_report import CacheReport
from radixserve.errors import InvalidRequestError, NotFoundError, PromptTooLongError
from radixserve.sampling import TokenLogprob


class WirePin(msgspec.Struct, array_like=True):
    """CachePin without its `alive` callback (the core asks `owner` instead)."""

    num_tokens: int
    ttl: float
    refresh: float | None
    owner: str | None


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    request_id: str
    prompt_token_ids: list[int]
    # SamplingParams' fields (guided as {kind, value}); rebuilt in the core, where bad values
    # raise InvalidRequestError back to this request instead of failing the frame's decoding
    params: dict[str, Any]
    namespace: str
    cache_pins: list[WirePin]
    arrival_time: float | None  # time.monotonic(): one clock for every process of the machine
    cache_policy: str
    cache_report: bool
    cache_report_namespaces: list[str]


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Call(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    name: str  # a key of ENGINE_CALLS
    args: list[Any]


class ForgetOwner(msgspec.Struct, tag=True, array_like=True):
    owner: str


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


ToCore = AddRequest | Abort | Call | ForgetOwner | Shutdown


class OutputDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's RequestOutput less what the client already has (prompt, earlier tokens)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_cached_tokens: int
    metrics: tuple[float, float | None, float | None, float | None]  # RequestMetrics, in order
    cache_write_tokens: int = 0
    error: str | None = None
    num_pinned_tokens: int = 0
    new_logprobs: list[TokenLogprob] = []
    index: int = 0
    cached_tokens_by_tier: dict[str, int] | None = None
    cache_report: CacheReport | None = None
    # Finished outputs only, and only when concatenating the deltas would not give them (see
    # EngineCore._delta): the whole output's token ids / text.
    token_ids: list[int] | None = None
    text: str | None = None


class Outputs(msgspec.Struct, tag=True, array_like=True):
    outputs: list[OutputDelta]


class CallResult(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    value: msgspec.Raw  # decoded by the caller against ENGINE_CALLS[name].returns
    error_type: str | None = None  # set: the call raised; value is empty
    error: str = ""


class Failed(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]
    error: str


FromCore = Outputs | CallResult | Failed

# Errors users can cause keep their type across the process boundary (the server maps each to its
# API's error shape); any other exception arrives as a RuntimeError with its type in the message.
WIRE_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (InvalidRequestError, PromptTooLongError, NotFoundError, ValueError, KeyError)
}


def error_from_wire(error_type: str, message: str) -> Exception:
    cls = WIRE_ERRORS.get(error_type)
    return cls(message) if cls is not None else RuntimeError(f"{error_type} in the engine process: {message}")


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def to_core_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(ToCore)


def from_core_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(FromCore)

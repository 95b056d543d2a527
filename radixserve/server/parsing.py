"""Reading request bodies: a size limit and a time limit enforced while reading, strict JSON,
then pydantic models.

Strict JSON here means what a client can portably send: no NaN/Infinity constants (Python's
json module accepts them, JSON does not) and no float that overflows to infinity, no lone UTF-16 surrogates in any string (they cannot
be encoded as UTF-8, so the tokenizer would fail on them later), and nesting no deeper than
`MAX_JSON_DEPTH` (deeper values would exhaust a recursion limit somewhere downstream).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from radixserve.server.errors import APIError, validation_message

M = TypeVar("M", bound=BaseModel)

# No API body needs more: a chat message's content part sits at depth 5.
MAX_JSON_DEPTH = 64
# Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones
# in a worker thread.
_PARSE_INLINE_BYTES = 64 * 1024


async def read_json(request: Request, max_bytes: int, timeout: float | None = None) -> dict[str, Any]:
    """The body as a JSON object. 413 past `max_bytes` (checked before and while reading, so a
    lying or absent Content-Length cannot smuggle a huge body in), 408 when the whole body has
    not arrived within `timeout` seconds (a body shorter than its Content-Length would otherwise
    hold the connection forever), 400 if it is not strict JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is too large: {declared} bytes, the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"request body is too large: more than {max_bytes} bytes")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout):
            await read()
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s "
                            f"({size} bytes read{f' of {declared}' if declared else ''})") from None
    body = b"".join(chunks)
    if len(body) > _PARSE_INLINE_BYTES:  # keep the event loop (and /health) responsive
        return await asyncio.to_thread(parse_json, body)
    return parse_json(body)


def parse_json(body: bytes) -> dict[str, Any]:
    """`body` as a strict JSON object, or a 400 saying what is wrong with it."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:  # the C parser stops near Python's recursion limit (~1000 levels)
        raise APIError(400, f"the request body nests too deeply; the limit is {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_values(data)
    return data


def _reject_constant(name: str) -> Any:
    raise APIError(400, f"the request body is not valid JSON: {name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise APIError(400, f"the request body holds the number {text[:40]}, which is out of range")
    return value


def _check_values(data: Any) -> None:
    """400 for a lone surrogate in any string or key, or nesting deeper than MAX_JSON_DEPTH
    (deeper values would recurse later: in pydantic, in json.dumps for the request log).
    An explicit stack, so the walk itself never recurses."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep", param=path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                _check_text(key, child)
                stack.append((item, child, depth + 1))
        else:
            stack.extend((item, f"{path}.{i}" if path else str(i), depth + 1) for i, item in enumerate(value))


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = where.encode("utf-8", "backslashreplace").decode("utf-8")  # the key itself may hold it
        raise APIError(400, f"{where or 'body'}: the string holds a lone UTF-16 surrogate, which is not valid "
                            "Unicode text", param=where or None) from None


def parse_model(model: type[M], data: dict[str, Any]) -> M:
    """Validate `data` as `model`; a failure is a 400 naming the first offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None

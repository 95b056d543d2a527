"""Reading request bodies: a size limit enforced while reading, JSON, then pydantic models."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from radixserve.server.errors import APIError, validation_message

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object. 413 past `max_bytes` (checked before and while reading, so a
    lying or absent Content-Length cannot smuggle a huge body in), 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is too large: {declared} bytes, the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is too large: more than {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def parse_model(model: type[M], data: dict[str, Any]) -> M:
    """Validate `data` as `model`; a failure is a 400 naming the first offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None

"""Shared prefixes: an operator publishes a system prompt that every tenant reads from the cache,
while what each tenant sends after it stays in its own namespace (cache/shared_scopes.py).

    POST   /v1/shared_prefixes          {"name": "support-bot", "system": "You are ..."}   (admin)
    DELETE /v1/shared_prefixes/{name}                                                    (admin)
    --shared-prefix FILE                 publishes FILE's text at startup, named after the file

The text is rendered as the system turn of a chat (the model's template, no generation prompt)
and its whole blocks are published: a chat request with the same system message starts with
exactly those tokens. The POST returns once the prefix is computed and cached.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from radixserve.errors import InvalidRequestError
from radixserve.server.errors import APIError
from radixserve.server.parsing import read_json
from radixserve.server.prompting import ChatTurn, build_prompt
from radixserve.server.state import ServerState, get_state

router = APIRouter()
log = logging.getLogger("radixserve.server")

READY_TIMEOUT_S = 600.0  # how long a publish waits for its prefill (a long prompt on a busy CPU)


async def publish(state: ServerState, name: str, system: str) -> dict:
    """Render `system` as a system turn, publish it as shared scope `name`, wait until cached."""
    if not state.prefix_caching:
        raise APIError(400, "shared prefixes need the prefix cache, and this server runs with --no-prefix-caching")
    prompt = await asyncio.to_thread(build_prompt, state.tokenizer, [ChatTurn("system", [system])], None, False)
    state.check_prompt_tokens(len(prompt.token_ids))
    try:
        await state.async_engine.publish_shared_prefix(name, prompt.token_ids)
    except InvalidRequestError as e:
        raise APIError(400, str(e), param="name" if "name" in str(e) else "system") from None
    wanted = len(prompt.token_ids) // state.block_size * state.block_size
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    while (cached := await state.async_engine.shared_prefix_cached_tokens(name)) < wanted:
        if asyncio.get_running_loop().time() > deadline:
            raise APIError(503, f"the shared prefix {name!r} was not cached within {READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)
    return {"name": name, "num_tokens": wanted, "cached_tokens": cached}


async def publish_files(state: ServerState, paths: list[str]) -> None:
    """--shared-prefix FILE...: publish each file's text under its name (letters, digits, _.-)."""
    for path in paths:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).stem)[:64] or "prefix"
        result = await publish(state, name, Path(path).read_text(encoding="utf-8"))
        log.info("shared prefix %r published from %s: %d tokens every tenant reads", name, path, result["num_tokens"])


@router.post("/v1/shared_prefixes")
async def create_shared_prefix(request: Request) -> JSONResponse:
    state = get_state(request)
    state.auth.authenticate_admin(request)
    data = await read_json(request, state.config.max_request_bytes, state.config.body_read_timeout)
    name, system = data.get("name"), data.get("system")
    if not isinstance(name, str) or not name:
        raise APIError(400, "name must be a non-empty string", param="name")
    if not isinstance(system, str) or not system:
        raise APIError(400, "system must be the non-empty text of the shared system prompt", param="system")
    return JSONResponse(await publish(state, name, system))


@router.delete("/v1/shared_prefixes/{name}")
async def delete_shared_prefix(name: str, request: Request) -> JSONResponse:
    state = get_state(request)
    state.auth.authenticate_admin(request)
    if not await state.async_engine.withdraw_shared_prefix(name):
        raise APIError(404, f"no shared prefix named {name!r}", param="name")
    return JSONResponse({"name": name, "deleted": True})

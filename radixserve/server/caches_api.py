"""Named-cache routes: POST/GET /v1/caches, GET/PATCH/DELETE /v1/caches/{id}.

The body follows Gemini's cachedContents, in snake_case (camelCase is accepted too): a model,
a display name, a system instruction and messages (OpenAI/Anthropic `messages` or Gemini
`contents`), and a lifetime as `ttl` ("300s") or `expire_time` (RFC 3339). Errors use
OpenAI's format. A cache belongs to the API key that created it (in every mode: isolated or
shared cache, only that key lists, reads, uses, updates or deletes it; with no keys configured,
every caller is the same tenant) and lives in the prefix-cache namespace of its creator (plus
`cache_salt`, if given).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from radixserve.server.caches import parse_lifetime
from radixserve.server.errors import APIError
from radixserve.server.parsing import parse_model, read_json
from radixserve.server.prompting import ChatTurn
from radixserve.server.state import get_state

router = APIRouter()


class _Body(BaseModel):
    # strict: no coercion (true is not 1 second, "5" is not a number), as the other APIs
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


class _Part(_Body):
    text: str


class _GeminiContent(_Body):
    role: str = "user"
    parts: list[_Part]


class _TextBlock(_Body):
    type: str = "text"
    text: str


class _Message(_Body):
    role: str
    content: str | list[_TextBlock]


class _Lifetime(_Body):
    ttl: str | float | None = None
    expire_time: str | None = Field(default=None, validation_alias=AliasChoices("expire_time", "expireTime"))


class CreateCacheRequest(_Lifetime):
    model: str | None = None
    display_name: str = Field(default="", validation_alias=AliasChoices("display_name", "displayName"))
    system: str | list[_TextBlock] | None = None
    system_instruction: str | _GeminiContent | None = Field(
        default=None, validation_alias=AliasChoices("system_instruction", "systemInstruction")
    )
    messages: list[_Message] | None = None
    contents: list[_GeminiContent] | None = None
    cache_salt: str | None = None

    def turns(self) -> list[ChatTurn]:
        if self.system is not None and self.system_instruction is not None:
            raise APIError(400, "give either system or system_instruction, not both", param="system")
        if self.messages is not None and self.contents is not None:
            raise APIError(400, "give either messages or contents, not both", param="messages")
        turns: list[ChatTurn] = []
        system = self.system if self.system is not None else self.system_instruction
        if isinstance(system, str) and system:
            turns.append(ChatTurn("system", [system]))
        elif isinstance(system, list) and system:
            turns.append(ChatTurn("system", [b.text for b in system]))
        elif isinstance(system, _GeminiContent):
            turns.append(ChatTurn("system", [p.text for p in system.parts]))
        for i, message in enumerate(self.messages or []):
            role = _role(message.role, f"messages.{i}.role")
            text = message.content if isinstance(message.content, str) else [b.text for b in message.content]
            turns.append(ChatTurn(role, [text] if isinstance(text, str) else text))
        for i, content in enumerate(self.contents or []):
            turns.append(ChatTurn(_role(content.role, f"contents.{i}.role"), [p.text for p in content.parts]))
        return turns


class UpdateCacheRequest(_Lifetime):
    pass


def _role(role: str, where: str) -> str:
    mapped = {"user": "user", "assistant": "assistant", "model": "assistant"}.get(role)
    if mapped is None:
        raise APIError(400, f"{where}: must be 'user', 'assistant' or 'model', got {role!r}", param=where)
    return mapped


@router.post("/v1/caches")
async def create_cache(request: Request) -> JSONResponse:
    state = get_state(request)
    tenant = state.auth.authenticate(request)
    data = await read_json(request, state.config.max_request_bytes, state.config.body_read_timeout)
    body = parse_model(CreateCacheRequest, data)
    if not tenant.cache_policy.writes:
        raise APIError(403, f"this API key's cache policy is {tenant.cache_policy.value!r}: it may not create "
                            "named caches", code="permission_denied")
    model = (body.model or state.model_name).removeprefix("models/")
    state.check_model(model)
    store = state.caches
    ttl, expire_time = parse_lifetime(body.ttl, body.expire_time, store.clock(), state.config.named_cache_default_ttl)
    cache = await store.create(
        owner=tenant.owner, namespace=tenant.namespace(body.cache_salt), model=state.model_name,
        display_name=body.display_name, turns=body.turns(), ttl=ttl, expire_time=expire_time, http_request=request,
    )
    return JSONResponse(cache.to_json())


@router.get("/v1/caches")
async def list_caches(request: Request) -> JSONResponse:
    state = get_state(request)
    tenant = state.auth.authenticate(request)
    return JSONResponse({"cached_contents": [c.to_json() for c in await state.caches.list_all(tenant.owner)]})


@router.get("/v1/caches/{cache_id}")
async def get_cache(cache_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    tenant = state.auth.authenticate(request)
    return JSONResponse((await state.caches.get(tenant.owner, cache_id)).to_json())


@router.patch("/v1/caches/{cache_id}")
async def update_cache(cache_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    tenant = state.auth.authenticate(request)
    data = await read_json(request, state.config.max_request_bytes, state.config.body_read_timeout)
    body = parse_model(UpdateCacheRequest, data)
    if body.ttl is None and body.expire_time is None:
        raise APIError(400, "give a new ttl or expire_time", param="ttl")
    store = state.caches
    now = store.clock()
    ttl, expire_time = parse_lifetime(body.ttl, body.expire_time, now, state.config.named_cache_default_ttl)
    expire = expire_time if expire_time is not None else now + ttl
    return JSONResponse((await store.update(tenant.owner, cache_id, expire)).to_json())


@router.delete("/v1/caches/{cache_id}")
async def delete_cache(cache_id: str, request: Request) -> JSONResponse:
    state = get_state(request)
    tenant = state.auth.authenticate(request)
    await state.caches.delete(tenant.owner, cache_id)
    return JSONResponse({})

"""What the ingress tells the router about a request: its prompt's content keys (plain Python).

The ingress renders and tokenizes the prompt exactly as the engine replica will (the same
protocol parsers, chat template and tokenizer, shipped once from a replica in a
``RoutingProfile``) and keys its cacheable blocks under the same model identity and tenant
namespace (API-key isolation + ``cache_salt``, or a named cache's own namespace). The router then
compares those keys with the replicas' KV events. Anything the ingress cannot parse gets no hint
(it is load balanced, and the replica answers with the proper error).
"""

from __future__ import annotations

import json
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from radixserve.cache.block_keys import BlockKey, CacheIdentity, prefix_keys
from radixserve.server.auth import Authenticator, Tenant, key_id, presented_key
from radixserve.server.config import ServerConfig
from radixserve.request import CachePolicy

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MESSAGES_PATH = "/v1/messages"


@dataclass(slots=True)
class RoutingProfile:
    """What the ingress needs to key prompts like the engines do (sent by one replica)."""

    tokenizer: Any
    identity: CacheIdentity  # model = the engine's cache identity (KVCacheManager.model_key)
    server_config: ServerConfig


class PieceMemoTokenizer:
    """The profile's tokenizer, remembering the ids of long prompt pieces it has encoded.

    ``build_prompt`` tokenizes a rendered prompt in pieces cut at the template's control tokens
    (where the tokenizer starts afresh), so a system prompt is one piece, and the ingress sees
    the same few system prompts over and over: they are what the cache-aware router is for.
    Their ids come from here instead of the tokenizer (a 4000-token system prompt: ~15 ms of
    tokenizing on the request's path, docs/benchmarks.md routing-overhead). Exact: a piece's ids
    do not depend on its neighbours. Bounded by the characters it holds (least recently used
    out first); thread-safe (hints are computed in worker threads)."""

    def __init__(self, tokenizer: Any, min_chars: int = 256, max_chars: int = 16_000_000) -> None:
        self.tokenizer = tokenizer
        self.min_chars = min_chars  # shorter pieces tokenize in microseconds
        self.max_chars = max_chars
        self._ids: OrderedDict[str, array] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:  # everything else is the tokenizer's
        return getattr(self.tokenizer, name)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(texts)
        with self._lock:
            for i, text in enumerate(texts):
                ids = self._ids.get(text) if len(text) >= self.min_chars else None
                if ids is not None:
                    self._ids.move_to_end(text)
                    out[i] = ids.tolist()
        todo = [i for i, ids in enumerate(out) if ids is None]
        encoded = self.tokenizer.encode_batch([texts[i] for i in todo], add_special_tokens) if todo else []
        with self._lock:
            self.hits += len(texts) - len(todo)
            self.misses += len(todo)
            for i, ids in zip(todo, encoded):
                out[i] = ids
                if len(texts[i]) >= self.min_chars and texts[i] not in self._ids:
                    self._remember(texts[i], ids)
        return out  # type: ignore[return-value]

    def _remember(self, text: str, ids: list[int]) -> None:
        if len(text) > self.max_chars:
            return
        self._ids[text] = array("q", ids)
        self._chars += len(text)
        while self._chars > self.max_chars:
            old, _ = self._ids.popitem(last=False)
            self._chars -= len(old)


@dataclass(slots=True)
class RoutedRequest:
    """One HTTP request as the ingress forwards it to an engine replica (through the router)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    # Routing hints. `prompt` is the prompt's text: Ray's PrefixCacheAffinityRouter reads it
    # (it looks for a `prompt` attribute); ours reads `keys`.
    prompt: str = ""
    keys: list[BlockKey] = field(default_factory=list)
    target_replica: str | None = None  # fan-out calls (metrics) name their replica


def tenant_of(auth: Authenticator, headers: Mapping[str, str]) -> Tenant | None:
    """The tenant a replica will see for these headers; None for a missing or wrong key (the
    replica refuses those). No constant-time compare needed: nothing here is returned to the
    client, the replica checks the key again."""
    key = presented_key(headers)
    if not auth.enabled:
        return Tenant(cache_policy=auth.default_cache_policy)
    if not key:
        return None
    kid = key_id(key)
    return Tenant(key_namespace=kid if auth.namespace_from_api_key else "", owner=kid,
                  cache_policy=CachePolicy.READ_WRITE)


def prompt_hint(
    profile: RoutingProfile,
    auth: Authenticator,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    named_cache: Callable[[str], Any] | None = None,
) -> tuple[str, list[BlockKey]]:
    """(prompt text, content keys of its cacheable blocks) for a generation request; ("", [])
    for anything else or anything malformed. ``named_cache(cache_id)`` returns a named cache's
    definition (turns, namespace) or None."""
    from radixserve.server.anthropic_protocol import MessagesRequest, build_conversation
    from radixserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
    from radixserve.server.parsing import parse_model
    from radixserve.server.prompting import build_prompt

    if path not in (CHAT_PATH, COMPLETIONS_PATH, MESSAGES_PATH):
        return "", []
    tenant = tenant_of(auth, headers)
    if tenant is None:
        return "", []
    try:
        data = json.loads(body)
        tokenizer = profile.tokenizer
        if path == COMPLETIONS_PATH:
            parsed = parse_model(CompletionRequest, data)
            first = parsed.prompts()[0]
            text = first if isinstance(first, str) else ""
            token_ids = tokenizer.encode(first) if isinstance(first, str) else list(first)
            namespace = tenant.namespace(parsed.cache_salt)
        else:
            model = ChatCompletionRequest if path == CHAT_PATH else MessagesRequest
            parsed = parse_model(model, data)
            namespace = tenant.namespace(parsed.cache_salt)
            cache_turns = None
            if parsed.cached_content and named_cache is not None:
                cache = named_cache(parsed.cached_content.removeprefix("caches/"))
                if cache is not None:
                    cache_turns, namespace = cache.turns, cache.namespace
            if path == CHAT_PATH:
                turns = (cache_turns or []) + parsed.turns()
                prompt = build_prompt(tokenizer, turns, tools=parsed.tool_specs())
            else:
                conversation = build_conversation(parsed, cache_turns)
                prompt = build_prompt(tokenizer, conversation.prompt_turns, conversation.assistant_prefill,
                                      tools=conversation.tools)
            text, token_ids = prompt.text, prompt.token_ids
    except Exception:  # noqa: BLE001 - a bad request is the replica's to refuse, with the API's error
        return "", []
    block_size = profile.identity.block_size
    cacheable = (len(token_ids) - 1) // block_size * block_size  # KVCacheManager.max_cacheable
    return text, prefix_keys(profile.identity, namespace, token_ids[:cacheable])

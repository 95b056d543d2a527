"""Anthropic Messages request bodies, and their explicit cache control.

A `cache_control: {"type": "ephemeral", "ttl": "5m" | "1h"}` on a system or message content
block is a breakpoint: the prompt prefix up to the end of that block is pinned in the prefix
cache for the TTL, refreshed each time it is used (any request that reads the whole pinned
prefix, with or without the breakpoint, extends the pin to a full TTL again). At most 4
breakpoints; a top-level `cache_control` puts one on the last block of the last message; a
1h breakpoint may not follow a 5m one; prefixes shorter than the server's minimum cacheable
length are not pinned (Anthropic ignores those too). Extensions: top_k is Anthropic's own;
cache_salt and cached_content are radixserve's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixserve.server.errors import APIError
from radixserve.server.prompting import ChatTurn

MAX_BREAKPOINTS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


class _Body(BaseModel):
    # strict: no coercion, as Anthropic's API (max_tokens: true is not 1, stream: "yes" is not true)
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentBlock(_Body):
    type: str
    text: str | None = None
    cache_control: Any = None


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class _ConversationFields(_Body):
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    cache_control: Any = None
    tools: list[Any] | None = None
    cache_salt: str | None = None
    cache_policy: str | None = None  # read_write | read_only | none (capped by the key's policy)
    cached_content: str | None = None


class MessagesRequest(_ConversationFields):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    tool_choice: Any = None
    thinking: Any = None


class CountTokensRequest(_ConversationFields):
    pass


@dataclass(slots=True)
class Breakpoint:
    """A cache_control marker: the prefix ends after blocks[block_index] of turns[turn_index]."""

    turn_index: int
    block_index: int
    ttl: str  # "5m" | "1h"


@dataclass(slots=True)
class Conversation:
    """A Messages request as chat turns. `turns` includes a trailing assistant turn when the
    request prefills the reply; `assistant_prefill` is then its text and the prompt is built
    from turns[:-1]."""

    turns: list[ChatTurn]
    breakpoints: list[Breakpoint]
    assistant_prefill: str | None = None

    @property
    def prompt_turns(self) -> list[ChatTurn]:
        return self.turns[:-1] if self.assistant_prefill is not None else self.turns


def build_conversation(body: _ConversationFields, prefix_turns: list[ChatTurn] | None = None) -> Conversation:
    """Validate content and cache control; `prefix_turns` come first (a named cache's)."""
    if body.tools:
        raise APIError(400, "tools are not supported: this server only generates text", param="tools")
    turns: list[ChatTurn] = []
    breakpoints: list[Breakpoint] = []
    if body.system is not None and body.system != "" and body.system != []:
        texts, marks = _blocks(body.system, "system")
        turns.append(ChatTurn("system", texts))
        breakpoints += [Breakpoint(0, j, ttl) for j, ttl in marks]
    if prefix_turns:
        if turns:
            raise APIError(400, "a request naming a cached_content takes its system instruction from the cache; "
                                "remove `system`", param="system")
        turns = list(prefix_turns)
    for i, message in enumerate(body.messages):
        texts, marks = _blocks(message.content, f"messages.{i}.content")
        breakpoints += [Breakpoint(len(turns), j, ttl) for j, ttl in marks]
        turns.append(ChatTurn(message.role, texts))
    if body.cache_control is not None:
        ttl = _cache_ttl(body.cache_control, "cache_control")
        last = turns[-1]
        if not any(b.turn_index == len(turns) - 1 and b.block_index == len(last.blocks) - 1 for b in breakpoints):
            breakpoints.append(Breakpoint(len(turns) - 1, max(len(last.blocks) - 1, 0), ttl))
    _check_breakpoints(breakpoints)
    prefill = None
    if body.messages[-1].role == "assistant":
        prefill = turns[-1].text
        if prefill != prefill.rstrip():
            raise APIError(400, "final assistant content cannot end with trailing whitespace", param="messages")
    return Conversation(turns, sorted(breakpoints, key=lambda b: (b.turn_index, b.block_index)), prefill)


def _blocks(content: str | list[ContentBlock], where: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The text of each block, and (block index, ttl) of those carrying cache_control."""
    if isinstance(content, str):
        return [content], []
    texts: list[str] = []
    marks: list[tuple[int, str]] = []
    for j, block in enumerate(content):
        if block.type != "text":
            raise APIError(400, f"{where}.{j}: content block type {block.type!r} is not supported; only 'text' blocks are")
        if block.text is None:
            raise APIError(400, f"{where}.{j}.text: field required")
        if block.cache_control is not None:
            if not block.text:
                raise APIError(400, f"{where}.{j}: cache_control cannot be set for empty text blocks")
            marks.append((j, _cache_ttl(block.cache_control, f"{where}.{j}.cache_control")))
        texts.append(block.text)
    return texts, marks


def _cache_ttl(cache_control: Any, where: str) -> str:
    if not isinstance(cache_control, dict):
        raise APIError(400, f"{where}: must be an object like {{\"type\": \"ephemeral\"}}")
    kind = cache_control.get("type")
    if kind != "ephemeral":
        raise APIError(400, f"{where}.type: must be 'ephemeral', got {kind!r}")
    unknown = set(cache_control) - {"type", "ttl"}
    if unknown:
        raise APIError(400, f"{where}: unexpected field {sorted(unknown)[0]!r}")
    ttl = cache_control.get("ttl")
    ttl = "5m" if ttl is None else ttl
    if not isinstance(ttl, str) or ttl not in TTL_SECONDS:
        raise APIError(400, f"{where}.ttl: must be '5m' or '1h', got {ttl!r}")
    return ttl


def _check_breakpoints(breakpoints: list[Breakpoint]) -> None:
    if len(breakpoints) > MAX_BREAKPOINTS:
        raise APIError(
            400, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(breakpoints)}."
        )
    ordered = sorted(breakpoints, key=lambda b: (b.turn_index, b.block_index))
    for earlier, later in zip(ordered, ordered[1:]):
        if earlier.ttl == "5m" and later.ttl == "1h":
            raise APIError(
                400, "a cache_control block with ttl '1h' cannot come after one with ttl '5m': longer TTLs go first"
            )

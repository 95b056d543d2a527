"""Anthropic Messages request bodies, and their explicit cache control.

A `cache_control: {"type": "ephemeral", "ttl": "5m" | "1h"}` on a system or message content
block is a breakpoint: the prompt prefix up to the end of that block is pinned in the prefix
cache for the TTL, refreshed each time it is used (any request that reads the whole pinned
prefix, with or without the breakpoint, extends the pin to a full TTL again). At most 4
breakpoints; a top-level `cache_control` puts one on the last block of the last message; a
1h breakpoint may not follow a 5m one; prefixes shorter than the server's minimum cacheable
length are not pinned (Anthropic ignores those too). Extensions: top_k is Anthropic's own;
cache_salt and cached_content are radixserve's.

Tools: `tools` ({name, description, input_schema, cache_control}), `tool_choice` ({"type":
"auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}), `tool_use` blocks in
assistant messages and `tool_result` blocks in user messages (each becomes a tool turn). A
cache_control on a tool definition is a breakpoint after the tool list: tools render before the
system text (server/tools.py), so they are the first part of the cached prefix, as Anthropic
caches tools, then system, then messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixserve.server.errors import APIError
from radixserve.server.prompting import ChatTurn
from radixserve.server.tools import ToolChoice, ToolSpec, check_parameters_schema, check_tool_name, check_unique

MAX_BREAKPOINTS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


class _Body(BaseModel):
    # strict: no coercion, as Anthropic's API (max_tokens: true is not 1, stream: "yes" is not true)
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentBlock(_Body):
    type: str
    text: str | None = None
    cache_control: Any = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Any = None
    # tool_result
    tool_use_id: str | None = None
    content: Any = None
    is_error: bool | None = None


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
    cache_report: bool = False  # usage.cache_report: why the prompt hit or missed the prefix cache
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
    tool_choice: Any = None


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
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)

    @property
    def prompt_turns(self) -> list[ChatTurn]:
        return self.turns[:-1] if self.assistant_prefill is not None else self.turns


def build_conversation(body: _ConversationFields, prefix_turns: list[ChatTurn] | None = None) -> Conversation:
    """Validate content and cache control; `prefix_turns` come first (a named cache's)."""
    tools, tool_marks = _tools(body.tools or [])
    choice = _tool_choice(getattr(body, "tool_choice", None), tools)
    turns: list[ChatTurn] = []
    breakpoints: list[Breakpoint] = [Breakpoint(-1, 0, ttl) for ttl in tool_marks]
    if body.system is not None and body.system != "" and body.system != []:
        texts, marks = _blocks(body.system, "system")
        turns.append(ChatTurn("system", texts))
        breakpoints += [Breakpoint(0, j, ttl) for j, ttl in marks]
    if prefix_turns:
        if turns:
            raise APIError(400, "a request naming a cached_content takes its system instruction from the cache; "
                                "remove `system`", param="system")
        turns = list(prefix_turns)
    call_ids: set[str] = set()
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list) and any(b.type in ("tool_use", "tool_result") for b in message.content):
            _tool_message(message, f"messages.{i}.content", turns, breakpoints, call_ids)
            continue
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
        if turns[-1].tool_calls:
            raise APIError(400, "the last message is an assistant tool_use: send its tool_result in a user message",
                           param="messages")
        prefill = turns[-1].text
        if prefill != prefill.rstrip():
            raise APIError(400, "final assistant content cannot end with trailing whitespace", param="messages")
    ordered = sorted(breakpoints, key=lambda b: (b.turn_index, b.block_index))
    return Conversation(turns, ordered, prefill, tools, choice)


def _tools(raw: list[Any]) -> tuple[list[ToolSpec], list[str]]:
    """ToolSpecs, and the TTLs of tools carrying cache_control (each a breakpoint after the tools)."""
    specs, marks = [], []
    for i, tool in enumerate(raw):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise APIError(400, f"{where}: must be an object", param=where)
        if tool.get("type") not in (None, "custom"):
            raise APIError(400, f"{where}.type: server tools ({tool.get('type')!r}) are not supported; "
                                "define client tools with name and input_schema", param=f"{where}.type")
        name = check_tool_name(tool.get("name"), f"{where}.name")
        if "input_schema" not in tool:
            raise APIError(400, f"{where}.input_schema: field required", param=f"{where}.input_schema")
        schema = check_parameters_schema(tool["input_schema"], f"{where}.input_schema")
        specs.append(ToolSpec(name, str(tool.get("description") or ""), schema))
        if tool.get("cache_control") is not None:
            marks.append(_cache_ttl(tool["cache_control"], f"{where}.cache_control"))
    check_unique(specs, "tools")
    return specs, marks[-1:]  # all tools render as one block: the last mark is the one that counts


def _tool_choice(raw: Any, tools: list[ToolSpec]) -> ToolChoice:
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if not isinstance(raw, dict) or raw.get("type") not in ("auto", "any", "tool", "none"):
        raise APIError(400, "tool_choice.type: must be 'auto', 'any', 'tool' or 'none'", param="tool_choice")
    parallel = not raw.get("disable_parallel_tool_use", False)
    kind = raw["type"]
    if kind != "none" and not tools:
        raise APIError(400, "tool_choice may only be specified while providing tools", param="tool_choice")
    if kind == "tool":
        name = raw.get("name")
        if name not in {t.name for t in tools}:
            raise APIError(400, f"tool_choice.name: {name!r} is not one of the tools", param="tool_choice")
        return ToolChoice("named", name, parallel=False)
    return ToolChoice({"any": "required"}.get(kind, kind), parallel=parallel)


def _tool_message(message: InputMessage, where: str, turns: list[ChatTurn], breakpoints: list[Breakpoint],
                  call_ids: set[str]) -> None:
    """An assistant message with tool_use blocks (one turn carrying the calls), or a user message
    with tool_result blocks (one tool turn per result, then a user turn for any text)."""
    assert isinstance(message.content, list)
    if message.role == "assistant":
        turn = ChatTurn("assistant")
        for j, block in enumerate(message.content):
            if block.type == "text":
                turn.blocks.append(block.text or "")
            elif block.type == "tool_use":
                if not block.id or not block.name:
                    raise APIError(400, f"{where}.{j}: tool_use blocks need id and name")
                turn.tool_calls.append({"id": block.id, "name": block.name,
                                        "arguments": block.input if block.input is not None else {}})
                call_ids.add(block.id)
            else:
                raise APIError(400, f"{where}.{j}: content block type {block.type!r} is not supported in an assistant "
                                    "message with tool_use")
            if block.cache_control is not None:
                breakpoints.append(Breakpoint(len(turns), j, _cache_ttl(block.cache_control, f"{where}.{j}.cache_control")))
        turns.append(turn)
        return
    pending_text: ChatTurn | None = None
    for j, block in enumerate(message.content):
        if block.type == "tool_result":
            if block.tool_use_id not in call_ids:
                raise APIError(400, f"{where}.{j}.tool_use_id: {block.tool_use_id!r} does not answer any tool_use "
                                    "block of an earlier assistant message")
            if pending_text is not None:
                turns.append(pending_text)
                pending_text = None
            text = _result_text(block.content, f"{where}.{j}.content")
            if block.is_error:
                text = f"Error: {text}"
            name = next((c["name"] for t in reversed(turns) for c in t.tool_calls if c["id"] == block.tool_use_id), None)
            if block.cache_control is not None:
                breakpoints.append(Breakpoint(len(turns), 0, _cache_ttl(block.cache_control, f"{where}.{j}.cache_control")))
            turns.append(ChatTurn("tool", [text], tool_call_id=block.tool_use_id, name=name))
        elif block.type == "text":
            if pending_text is None:
                pending_text = ChatTurn("user")
            if block.cache_control is not None:
                ttl = _cache_ttl(block.cache_control, f"{where}.{j}.cache_control")
                breakpoints.append(Breakpoint(len(turns), len(pending_text.blocks), ttl))
            pending_text.blocks.append(block.text or "")
        else:
            raise APIError(400, f"{where}.{j}: content block type {block.type!r} is not supported")
    if pending_text is not None:
        turns.append(pending_text)


def _result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(400, f"{where}.{k}: only text content is supported in a tool_result")
            texts.append(str(part.get("text", "")))
        return "\n\n".join(texts)
    raise APIError(400, f"{where}: must be a string or a list of text blocks")


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

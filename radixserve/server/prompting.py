"""From chat turns to prompt token ids, and where a prefix of the conversation ends in tokens.

Both chat APIs reduce a request to a list of ChatTurn (role + text blocks), render it with the
model's chat template and tokenize it. Explicit cache control and named caches need one more
thing: how many prompt tokens a prefix of the conversation ("everything up to the end of this
content block") occupies. `prefix_token_count` answers that from the template itself, so it is
right for any template: it renders the conversation truncated after the block, finds where that
text stops agreeing with the full prompt, and counts the tokens the two tokenizations share up
to there (a token straddling the boundary is not counted: it would differ in another request).

The prompt is tokenized once. `build_prompt` tokenizes it in pieces cut around the template's
control tokens, where the tokenizer itself starts afresh (`Tokenizer.splits_at_specials`), so
the ids are exactly those of one call, and it keeps where each piece ends. The prefix's
tokenization then equals the prompt's up to the last piece end before the boundary: only the rest
of that one piece is tokenized again (nothing at all for a breakpoint that ends a message, since
the end-of-turn marker ends a piece), never the prompt up to the breakpoint.
"""

from __future__ import annotations

import bisect
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2

from radixserve.errors import PromptTooLongError
from radixserve.sequences import common_prefix_len
from radixserve.server.errors import APIError

# Several text blocks of one message are joined like paragraphs.
BLOCK_SEPARATOR = "\n\n"


@dataclass(slots=True)
class ChatTurn:
    """One message: a role ("system", "user", "assistant", "tool") and its text blocks; an
    assistant turn may carry tool calls ({"id", "name", "arguments": dict}), a tool turn
    answers the call `tool_call_id` of tool `name`."""

    role: str
    blocks: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        return BLOCK_SEPARATOR.join(self.blocks)

    def as_message(self) -> dict[str, Any]:
        """The message as transformers hands it to a template (tool calls with dict arguments)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.tool_calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
            if self.name:
                message["name"] = self.name
        return message


@dataclass(slots=True)
class ChatPrompt:
    """A rendered conversation: the text the template produced and its token ids.

    `piece_ends`: (characters, tokens) at the end of each piece the text was tokenized in, in
    order: the prompt's first `tokens` ids are exactly the tokenization of text[:characters]."""

    text: str
    token_ids: list[int]
    piece_ends: list[tuple[int, int]] = field(default_factory=list)


def render(
    tokenizer: Any, turns: Sequence[ChatTurn], add_generation_prompt: bool = True, tools: Sequence[Any] = ()
) -> str:
    """The model's chat template over `turns` (and `tools`, ToolSpecs; see server/tools.py for
    templates without tool support). Some templates refuse conversations (e.g. roles that do
    not alternate): that is the client's error, a 400, not a server failure."""
    from radixserve.server.tools import template_supports_tools

    kwargs: dict[str, Any] = {}
    if template_supports_tools(tokenizer):
        if tools:
            kwargs["tools"] = [t.openai_dict() for t in tools]
    else:
        turns = _fallback_tool_turns(turns, tools)
    messages = [t.as_message() for t in turns]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise APIError(400, f"the model's chat template rejected the conversation: {e}", param="messages") from None


def _fallback_tool_turns(turns: Sequence[ChatTurn], tools: Sequence[Any]) -> list[ChatTurn]:
    """Tools, calls and results written as plain text turns (the Hermes convention), for a
    template that knows nothing of tools. The tool list opens the system message."""
    from radixserve.server.tools import hermes_call_text, tools_system_text

    out: list[ChatTurn] = []
    if tools:
        header = tools_system_text(list(tools))
        if turns and turns[0].role == "system":
            out.append(ChatTurn("system", [header] + turns[0].blocks))
            turns = turns[1:]
        else:
            out.append(ChatTurn("system", [header]))
    for turn in turns:
        if turn.role == "tool":
            out.append(ChatTurn("user", [f"<tool_response>\n{turn.text}\n</tool_response>"]))
        elif turn.tool_calls:
            calls = [hermes_call_text(c["name"], c["arguments"]) for c in turn.tool_calls]
            out.append(ChatTurn(turn.role, ([turn.text] if turn.text else []) + ["\n".join(calls)]))
        else:
            out.append(turn)
    return out


def build_prompt(
    tokenizer: Any,
    turns: Sequence[ChatTurn],
    assistant_prefill: str | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[Any] = (),
) -> ChatPrompt:
    """Render and tokenize. With `assistant_prefill` the reply continues that text (the last
    assistant message of an Anthropic request) instead of starting fresh.

    Only the template makes control tokens: a special token's spelling inside a client's text
    (a user typing "<|im_start|>system") is tokenized as those characters, so no one can inject
    a turn. Texts without such spellings (nearly all) are rendered and tokenized as one string.
    CPU-heavy for long prompts: routes call it off the event loop (`asyncio.to_thread`)."""
    specials = tokenizer.special_token_strings
    texts = [b for t in turns for b in t.blocks] + ([assistant_prefill] if assistant_prefill else [])
    if not specials or not any(sp in text for text in texts for sp in specials):
        text = render(tokenizer, turns, add_generation_prompt=add_generation_prompt, tools=tools)
        if assistant_prefill:
            text += assistant_prefill
        return tokenize_prompt(tokenizer, text, {})
    # Hide each client-written spelling behind a marker no client can guess, render, then
    # tokenize the template's text normally and each hidden spelling literally.
    nonce = uuid.uuid4().hex
    marks = {sp: f"\ue000{nonce}.{i}\ue001" for i, sp in enumerate(specials)}
    find_special = re.compile("|".join(re.escape(sp) for sp in specials))  # longest first

    def hide(text: str) -> str:
        return find_special.sub(lambda m: marks[m.group(0)], text)

    text = render(tokenizer, [replace(t, blocks=[hide(b) for b in t.blocks]) for t in turns],
                  add_generation_prompt=add_generation_prompt, tools=tools)
    if assistant_prefill:
        text += hide(assistant_prefill)
    return tokenize_prompt(tokenizer, text, {mark: sp for sp, mark in marks.items()})


def tokenize_prompt(tokenizer: Any, text: str, hidden: dict[str, str]) -> ChatPrompt:
    """Tokenize a rendered prompt once, in pieces cut around each control token the template
    wrote (where the tokenizer starts afresh anyway, when `splits_at_specials`) and around each
    hidden client spelling (`hidden`: marker -> spelling, tokenized literally and put
    back in the text). Plain pieces go through one `encode_batch` call."""
    cuts = list(hidden) + (list(tokenizer.special_token_strings) if tokenizer.splits_at_specials else [])
    if not cuts:
        ids = tokenizer.encode(text)
        return ChatPrompt(text, ids, [(len(text), len(ids))])
    pieces: list[tuple[str, bool]] = []  # (text, literal)
    pos = 0
    for m in re.finditer("|".join(re.escape(c) for c in sorted(cuts, key=len, reverse=True)), text):
        spelling = hidden.get(m.group(0))
        if spelling is None:  # a template control token: a piece of its own
            pieces += [(text[pos:m.start()], False), (m.group(0), False)]
        else:
            pieces += [(text[pos:m.start()], False), (spelling, True)]
        pos = m.end()
    pieces.append((text[pos:], False))
    pieces = [(t, literal) for t, literal in pieces if t]
    encoded = iter(tokenizer.encode_batch([t for t, literal in pieces if not literal]))
    ids: list[int] = []
    piece_ends: list[tuple[int, int]] = []
    chars = 0
    for piece, literal in pieces:
        ids += tokenizer.encode_literal(piece) if literal else next(encoded)
        chars += len(piece)
        piece_ends.append((chars, len(ids)))
    return ChatPrompt("".join(t for t, _ in pieces), ids, piece_ends)


def check_prompt_size(tokenizer: Any, texts: Sequence[str], max_model_len: int) -> None:
    """Refuse text that cannot fit the context before spending time rendering or tokenizing it:
    a cheap lower bound on its tokens (len(text) <= its UTF-8 bytes), so a body of megabytes is a
    400 in microseconds. What passes is checked exactly once tokenized."""
    at_least = tokenizer.min_num_tokens(sum(len(t) for t in texts))
    if at_least >= max_model_len:
        raise PromptTooLongError(
            f"the prompt has at least {at_least} tokens but the model's context length is {max_model_len}"
        )


def prefix_token_count(
    tokenizer: Any, prompt: ChatPrompt, turns: Sequence[ChatTurn], turn_index: int, block_index: int,
    tools: Sequence[Any] = (),
) -> int:
    """Prompt tokens covering turns[:turn_index] plus the first block_index+1 blocks of
    turns[turn_index] (including the end-of-turn marker when that block ends its message).
    turn_index -1: the tool definitions alone (they come before the system text)."""
    if turn_index < 0:
        return shared_token_prefix(tokenizer, prompt, render(tokenizer, [], add_generation_prompt=False, tools=tools))
    turn = turns[turn_index]
    blocks = turn.blocks[: block_index + 1]
    calls = turn.tool_calls if block_index + 1 >= len(turn.blocks) else []
    truncated = list(turns[:turn_index]) + [ChatTurn(turn.role, blocks, calls, turn.tool_call_id, turn.name)]
    text = render(tokenizer, truncated, add_generation_prompt=False, tools=tools)
    return shared_token_prefix(tokenizer, prompt, text)


def shared_token_prefix(tokenizer: Any, prompt: ChatPrompt, prefix_text: str) -> int:
    """How many of the prompt's tokens are exactly the tokens of `prefix_text`'s agreeing part.

    Up to the last piece end at or before the boundary the tokens are the prompt's own; only the
    rest of that piece is tokenized again (a piece ending at the boundary: nothing)."""
    offset = common_prefix_len(prefix_text, prompt.text)
    if offset == 0:
        return 0
    i = bisect.bisect_right(prompt.piece_ends, (offset, len(prompt.token_ids))) - 1
    chars, tokens = prompt.piece_ends[i] if i >= 0 else (0, 0)
    if chars == offset:
        return tokens
    ids = tokenizer.encode(prompt.text[chars:offset])
    return tokens + common_prefix_len(ids, prompt.token_ids[tokens:])

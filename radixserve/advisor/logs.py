"""Reading a request log and turning each request body into the prompt token ids the engine sees.

Accepted lines (JSONL, one request each):

- records written by :class:`~radixserve.request_log.RequestLogWriter`:
  ``{"ts": ..., "api": "chat", "namespace": "...", "body": {...}}``;
- OpenAI batch-file lines: ``{"custom_id": ..., "url": "/v1/chat/completions", "body": {...}}``;
- bare request bodies: OpenAI chat (``messages``), OpenAI completions (``prompt``), Anthropic
  messages (``messages`` + optional ``system``), or ``{"prompt": ...}``, optionally with a
  ``ts``/``timestamp`` field.

Rendering is the server's own (radixserve/server/*_protocol.py + prompting.py): the same turns,
the same chat template, the same tokenizer call, so the advisor replays exactly the token ids the
server would hand the engine. Bodies the server would refuse as they are (tool definitions,
images, ...) are still analysed, from their text parts, and counted in ``LoadedLog.lenient``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from radixserve.request_log import API_KINDS, API_PATHS
from radixserve.errors import InvalidRequestError

_TIMESTAMP_KEYS = ("ts", "timestamp", "time", "created_at", "created")
# Content block types that only Anthropic's Messages API has: they tell a bare Anthropic body
# from an OpenAI chat body when the log does not say which API it came from.
_ANTHROPIC_BLOCKS = {"tool_use", "tool_result", "image", "document", "thinking", "redacted_thinking"}
# How many texts go to the tokenizer at once (encode_batch runs them in parallel).
_ENCODE_CHUNK = 256


@dataclass(slots=True)
class PromptRequest:
    """One engine request to replay: where it came from, when, in which namespace, its prompt."""

    index: int  # position in the replay, 0-based
    line: int  # 1-based line number in the log
    api: str  # one of API_KINDS
    namespace: str  # prefix-cache namespace (tenants never share cached blocks)
    timestamp: float | None  # wall-clock seconds, None when the log has none
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SkippedLine:
    """A log line that yields no request, and why."""

    line: int
    reason: str


@dataclass(slots=True)
class LoadedLog:
    """A log read and tokenized: the requests in log order, plus what could not be used."""

    path: str
    requests: list[PromptRequest]
    skipped: list[SkippedLine] = field(default_factory=list)
    # Requests the server would refuse as sent (tools, images, ...), replayed from their text.
    lenient: Counter[str] = field(default_factory=Counter)
    api_counts: Counter[str] = field(default_factory=Counter)
    # The server's own cache reports (--cache-report / "cache_report": true), by reason: how many
    # requests, and how many prompt tokens they missed. Lines with a report carry no body.
    cache_reasons: Counter[str] = field(default_factory=Counter)
    cache_reason_missed_tokens: Counter[str] = field(default_factory=Counter)

    def count_cache_report(self, report: dict[str, Any]) -> None:
        reason = report.get("reason")
        if isinstance(reason, str):
            self.cache_reasons[reason] += 1
            missed = report.get("missed_tokens")
            self.cache_reason_missed_tokens[reason] += missed if isinstance(missed, int) else 0

    @property
    def has_timestamps(self) -> bool:
        return bool(self.requests) and all(r.timestamp is not None for r in self.requests)

    @property
    def namespaces(self) -> list[str]:
        return sorted({r.namespace for r in self.requests})


@dataclass(slots=True)
class _Pending:
    """A request between parsing and tokenizing: rendered text, or token ids already."""

    line: int
    api: str
    namespace: str
    timestamp: float | None
    text: str | None = None
    token_ids: list[int] | None = None


def read_log(
    path: str | Path,
    tokenizer: Any,
    *,
    vocab_size: int | None = None,
    progress: Callable[[Sequence[Any]], Any] | None = None,
) -> LoadedLog:
    """Read ``path`` (JSONL) and tokenize every request with ``tokenizer`` and its chat template.

    ``vocab_size`` rejects token-id prompts the model could not take (as the engine does).
    ``progress`` wraps the chunk iterator (e.g. with tqdm) for long logs. Raises
    InvalidRequestError when the file holds no usable request at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"request log {str(path)!r} not found")
    pending: list[_Pending] = []
    log = LoadedLog(str(path), [])
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report = _cache_report(line)
            if report is not None:
                log.count_cache_report(report)
                continue
            try:
                pending.extend(_parse_line(line, line_no, tokenizer, log.lenient))
            except _Skip as e:
                log.skipped.append(SkippedLine(line_no, str(e)))
    _tokenize(pending, tokenizer, progress)
    for p in pending:
        ids = p.token_ids or []
        if not ids:
            log.skipped.append(SkippedLine(p.line, "empty prompt"))
            continue
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
            log.skipped.append(SkippedLine(p.line, f"token ids outside the model's vocabulary (0..{vocab_size - 1})"))
            continue
        log.requests.append(PromptRequest(len(log.requests), p.line, p.api, p.namespace, p.timestamp, ids))
        log.api_counts[p.api] += 1
    if not log.requests:
        detail = f": line {log.skipped[0].line}: {log.skipped[0].reason}" if log.skipped else " (the file is empty)"
        raise InvalidRequestError(f"no usable request in {path}{detail}")
    return log


def requests_from_bodies(
    bodies: Sequence[dict[str, Any]], tokenizer: Any, api: str | None = None
) -> list[PromptRequest]:
    """Tokenize request bodies given in memory (tests, notebooks), like ``read_log`` does."""
    pending: list[_Pending] = []
    lenient: Counter[str] = Counter()
    for i, body in enumerate(bodies, start=1):
        record = {"api": api, "body": body} if api else body
        pending.extend(_parse_record(record, i, tokenizer, lenient))
    _tokenize(pending, tokenizer, None)
    return [
        PromptRequest(i, p.line, p.api, p.namespace, p.timestamp, p.token_ids or []) for i, p in enumerate(pending)
    ]


# ---- parsing ----------------------------------------------------------------------------


class _Skip(Exception):
    """This line yields no request (the message says why)."""


def _cache_report(line: str) -> dict[str, Any] | None:
    """The cache report of a report line (RequestLogWriter.write_cache_report), else None."""
    if '"cache_report"' not in line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and "body" not in record and isinstance(record.get("cache_report"), dict):
        return record["cache_report"]
    return None


def _parse_line(line: str, line_no: int, tokenizer: Any, lenient: Counter[str]) -> list[_Pending]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Skip(f"not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise _Skip(f"expected a JSON object, got {type(record).__name__}")
    return _parse_record(record, line_no, tokenizer, lenient)


def _parse_record(record: dict[str, Any], line_no: int, tokenizer: Any, lenient: Counter[str]) -> list[_Pending]:
    body = record.get("body", record.get("request"))
    if isinstance(body, dict):
        wrapper = record
    else:
        body, wrapper = record, record
    api = _api_kind(wrapper, body)
    timestamp = _timestamp(wrapper) if wrapper is not body else None
    if timestamp is None:
        timestamp = _timestamp(body)
    namespace = wrapper.get("namespace") if wrapper is not body else None
    if not isinstance(namespace, str):
        # What the server derives from a request without API-key tenancy (server/auth.py).
        salt = body.get("cache_salt")
        namespace = f"salt:{salt}" if isinstance(salt, str) and salt else ""
    if api in ("completions", "prompt"):
        return [
            _Pending(line_no, api, namespace, timestamp, token_ids=p) if isinstance(p, list)
            else _Pending(line_no, api, namespace, timestamp, text=p)
            for p in _completion_prompts(body)
        ]
    text = _render_chat(api, body, tokenizer, lenient)
    return [_Pending(line_no, api, namespace, timestamp, text=text)]


def _api_kind(wrapper: dict[str, Any], body: dict[str, Any]) -> str:
    for key in ("api", "kind", "endpoint", "url", "path"):
        value = wrapper.get(key)
        if isinstance(value, str) and value:
            if value in API_KINDS:
                return value
            path = "/" + value.split("://", 1)[-1].split("/", 1)[-1] if "://" in value else value
            for suffix, kind in API_PATHS.items():
                if path.rstrip("/").endswith(suffix):
                    return kind
            aliases = {"chat.completions": "chat", "chat_completions": "chat", "anthropic": "messages", "openai": "chat"}
            if value in aliases:
                return aliases[value]
            raise _Skip(f"unknown API {value!r} (expected one of {', '.join(API_KINDS)} or an API path)")
    if "messages" in body:
        if "system" in body or "anthropic_version" in body or "stop_sequences" in body:
            return "messages"
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") in _ANTHROPIC_BLOCKS for b in content
            ):
                return "messages"
        return "chat"
    if "prompt" in body:
        return "completions" if "model" in body else "prompt"
    raise _Skip("no 'messages' or 'prompt' field: not a chat, completions or messages request body")


def _timestamp(obj: dict[str, Any]) -> float | None:
    for key in _TIMESTAMP_KEYS:
        value = obj.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            # Milliseconds since the epoch are common in logs; seconds are what we use.
            return float(value) / 1000.0 if value > 1e11 else float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                try:
                    return float(value)
                except ValueError:
                    continue
    return None


def _completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt:
        prompts = list(prompt)
    else:
        raise _Skip("'prompt' must be a string, a list of strings, token ids, or lists of token ids")
    for p in prompts:
        ok = isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p))
        if not ok:
            raise _Skip("'prompt' must be a string, a list of strings, token ids, or lists of token ids")
    return prompts


# ---- chat rendering ---------------------------------------------------------------------


def _render_chat(api: str, body: dict[str, Any], tokenizer: Any, lenient: Counter[str]) -> str:
    """The prompt text the server would tokenize for this chat/messages body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Skip("'messages' must be a non-empty list")
    server = _server_modules()
    if server is not None:
        prompting, openai_protocol, anthropic_protocol, api_error = server
        # The server's models require `model`; a log may have stripped it.
        data = {**body, "model": body.get("model") or "advisor"}
        try:
            if api == "chat":
                request = openai_protocol.ChatCompletionRequest.model_validate(data)
                return prompting.render(tokenizer, request.turns(), add_generation_prompt=True,
                                        tools=request.tool_specs())
            else:
                request = anthropic_protocol.CountTokensRequest.model_validate(data)
                conversation = anthropic_protocol.build_conversation(request)
                text = prompting.render(tokenizer, conversation.prompt_turns, add_generation_prompt=True,
                                        tools=conversation.tools)
                return text + (conversation.assistant_prefill or "")
        except (api_error, ValueError):  # pydantic's ValidationError is a ValueError
            pass
    # The server would refuse this body as sent (or is unavailable): analyse its text parts.
    turns, prefill, features = _lenient_turns(api, body)
    lenient.update(features or ["malformed"])
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    except Exception as e:  # a template's raise_exception (e.g. roles must alternate)
        raise _Skip(f"the chat template refused the conversation: {e}") from None
    return text + (prefill or "")


def _server_modules() -> tuple[Any, Any, Any, type[Exception]] | None:
    """The server's request models and renderer (imported lazily: they pull in FastAPI)."""
    try:
        from radixserve.server import anthropic_protocol, openai_protocol, prompting
        from radixserve.server.errors import APIError
    except ImportError:
        return None
    return prompting, openai_protocol, anthropic_protocol, APIError


def _lenient_turns(api: str, body: dict[str, Any]) -> tuple[list[dict[str, str]], str | None, list[str]]:
    """Messages as {role, content} with text extracted from every part the server would refuse."""
    features: list[str] = []
    if body.get("tools"):
        features.append("tools")
    turns: list[dict[str, str]] = []
    system = body.get("system") if api == "messages" else None
    if system:
        turns.append({"role": "system", "content": _blocks_text(system, "\n\n", features)})
    for message in body["messages"]:
        if not isinstance(message, dict):
            raise _Skip("every message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise _Skip("every message needs a 'role'")
        role = "system" if role == "developer" else role
        # OpenAI concatenates text parts; Anthropic's blocks are paragraphs (server/prompting.py).
        text = _blocks_text(message.get("content"), "" if api == "chat" else "\n\n", features)
        if message.get("tool_calls"):
            features.append("tool_calls")
            text += json.dumps(message["tool_calls"], ensure_ascii=False, sort_keys=True)
        if role not in ("system", "user", "assistant"):
            features.append(f"role:{role}")
        turns.append({"role": role, "content": text})
    prefill = None
    if api == "messages" and turns and turns[-1]["role"] == "assistant":
        prefill = turns.pop()["content"]
    return turns, prefill, features


def _blocks_text(content: Any, separator: str, features: list[str]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return str(content)
    texts = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
            continue
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "input_text") and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result":
            features.append("tool_result")
            texts.append(_blocks_text(block.get("content"), separator, features))
        elif kind == "tool_use":
            features.append("tool_use")
            texts.append(json.dumps(block.get("input", {}), ensure_ascii=False, sort_keys=True))
        else:
            # Images and documents: a fixed placeholder keeps later content at a stable offset
            # relative to other requests that carry the same attachment slot.
            features.append(str(kind))
            texts.append(f"[{kind}]")
    return separator.join(texts)


# ---- tokenizing -------------------------------------------------------------------------


def _tokenize(pending: list[_Pending], tokenizer: Any, progress: Callable[[Sequence[Any]], Any] | None) -> None:
    todo = [p for p in pending if p.token_ids is None]
    chunks = [todo[i : i + _ENCODE_CHUNK] for i in range(0, len(todo), _ENCODE_CHUNK)]
    for chunk in progress(chunks) if progress is not None else chunks:
        # The server encodes each prompt with tokenizer.encode(text); encode_batch is the same
        # call on several texts at once.
        for p, ids in zip(chunk, tokenizer.encode_batch([p.text or "" for p in chunk])):
            p.token_ids = ids


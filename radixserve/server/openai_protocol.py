"""OpenAI request bodies (pydantic), and the checks that turn them into engine inputs.

Unknown fields are ignored, as in vLLM: clients send many optional ones. Fields we cannot honour
with a non-default value (penalties, logit_bias...) are rejected with a clear 400
rather than silently ignored. Tools, tool_choice, response_format (json_object, json_schema),
logprobs / top_logprobs, n (up to MAX_N choices sharing one prefill) and (completions) echo are
honoured. Extensions: top_k, ignore_eos, cache_salt (the prefix-cache
namespace) and cached_content (a named cache, "caches/<id>").
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixserve.sampling import MAX_LOGPROBS, MAX_N, SEED_MAX, SEED_MIN, SamplingParams
from radixserve.server.errors import APIError
from radixserve.server.prompting import ChatTurn
from radixserve.server.tools import (
    ToolChoice,
    ToolSpec,
    check_json_schema,
    check_parameters_schema,
    check_tool_name,
    check_unique,
)
from radixserve.structured import GuidedSpec

MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit


class _Body(BaseModel):
    # strict: no coercion, as OpenAI's API (max_tokens: true is not 1, stream: "yes" is not true)
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    cache_salt: str | None = None
    cache_policy: str | None = None  # read_write | read_only | none (capped by the key's policy)
    cache_report: bool = False  # usage.cache_report: why the prompt hit or missed the prefix cache

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; omit it or send 0", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop may hold at most 4 sequences, got {len(stop)}", param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            n=self.n,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    cached_content: str | None = None

    @property
    def max_tokens_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                               param="top_logprobs")
            if not self.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_specs(self) -> list[ToolSpec]:
        specs = []
        for i, tool in enumerate(self.tools or []):
            where = f"tools.{i}"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise APIError(400, f"{where}.type: only 'function' tools are supported", param=f"{where}.type")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise APIError(400, f"{where}.function: field required", param=f"{where}.function")
            name = check_tool_name(function.get("name"), f"{where}.function.name")
            parameters = check_parameters_schema(function.get("parameters"), f"{where}.function.parameters")
            specs.append(ToolSpec(name, str(function.get("description") or ""), parameters))
        check_unique(specs, "tools")
        return specs

    def tool_choice_spec(self, tools: list[ToolSpec]) -> ToolChoice:
        choice = self.tool_choice
        parallel = self.parallel_tool_calls is not False
        if choice is None:
            return ToolChoice("auto" if tools else "none", parallel=parallel)
        if not tools and choice != "none":
            raise APIError(400, "tool_choice is only allowed when tools are specified", param="tool_choice")
        if choice in ("none", "auto", "required"):
            return ToolChoice(choice, parallel=parallel)
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if name not in {t.name for t in tools}:
                raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                               param="tool_choice")
            return ToolChoice("named", name, parallel=False)
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")

    def guided_spec(self) -> GuidedSpec | None:
        """The grammar response_format asks for (None: free text)."""
        fmt = self.response_format
        if fmt is None:
            return None
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return GuidedSpec("json_object")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise APIError(400, "response_format.json_schema: field required", param="response_format.json_schema")
            if not isinstance(spec.get("name"), str) or not spec["name"]:
                raise APIError(400, "response_format.json_schema.name: field required",
                               param="response_format.json_schema.name")
            schema = spec.get("schema", {})
            check_json_schema(schema, "response_format.json_schema.schema")
            return GuidedSpec("json_schema", schema)
        raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                       param="response_format.type")

    def turns(self) -> list[ChatTurn]:
        turns = []
        call_ids: set[str] = set()
        for i, message in enumerate(self.messages):
            where = f"messages.{i}"
            role = "system" if message.role == "developer" else message.role
            turn = ChatTurn(role, [_content_text(message.content, f"{where}.content")])
            if message.tool_calls:
                if role != "assistant":
                    raise APIError(400, f"{where}.tool_calls: only assistant messages carry tool calls",
                                   param=f"{where}.tool_calls")
                turn.tool_calls = [_tool_call(c, f"{where}.tool_calls.{j}") for j, c in enumerate(message.tool_calls)]
                turn.blocks = [b for b in turn.blocks if b]
                call_ids.update(c["id"] for c in turn.tool_calls)
            if role == "tool":
                if message.tool_call_id not in call_ids:
                    raise APIError(400, f"{where}.tool_call_id: {message.tool_call_id!r} does not answer any tool call "
                                        "of an earlier assistant message", param=f"{where}.tool_call_id")
                turn.tool_call_id = message.tool_call_id
                turn.name = message.name or _call_name(turns, message.tool_call_id)
            turns.append(turn)
        return turns


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("id"), str):
        raise APIError(400, f"{where}.id: field required", param=f"{where}.id")
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{where}.function.name: field required", param=f"{where}.function.name")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise APIError(400, f"{where}.function.arguments: not valid JSON", param=f"{where}.function.arguments") from None
    return {"id": call["id"], "name": function["name"], "arguments": arguments}


def _call_name(turns: list[ChatTurn], call_id: str | None) -> str | None:
    for turn in reversed(turns):
        for call in turn.tool_calls:
            if call["id"] == call_id:
                return call["name"]
    return None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {self.logprobs}",
                           param="logprobs")
        if self.echo and self.logprobs is not None:
            # the prompt's own logprobs would need a full prefill with every position's logits
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """One or several prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list[str | list[int]] = [p]
        elif not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        for prompt in prompts:
            if len(prompt) == 0:
                raise APIError(400, "prompt must not be empty", param="prompt")
        return prompts


def _content_text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise APIError(
                400, f"{where}.{j}: content part type {part.type!r} is not supported; only 'text' parts are",
                param=f"{where}.{j}.type",
            )
        if part.text is None:
            raise APIError(400, f"{where}.{j}.text: field required", param=f"{where}.{j}.text")
        texts.append(part.text)
    return "".join(texts)  # OpenAI concatenates text parts

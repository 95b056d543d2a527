"""OpenAI request bodies (pydantic), and the checks that turn them into engine inputs.

Unknown fields are ignored, as in vLLM: clients send many optional ones. Fields we cannot honour
with a non-default value (n > 1, logprobs, tools, penalties...) are rejected with a clear 400
rather than silently ignored. Extensions: top_k, ignore_eos, cache_salt (the prefix-cache
namespace) and cached_content (a named cache, "caches/<id>").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from radixserve.sampling import SEED_MAX, SEED_MIN, SamplingParams
from radixserve.server.errors import APIError
from radixserve.server.prompting import ChatTurn


class _Body(BaseModel):
    # strict: no coercion, as OpenAI's API (max_tokens: true is not 1, stream: "yes" is not true)
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


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

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n must be 1 (this server returns one choice per prompt), got {self.n}", param="n")
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
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    cached_content: str | None = None

    @property
    def max_tokens_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported: this server only generates text", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")

    def turns(self) -> list[ChatTurn]:
        turns = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            turns.append(ChatTurn(role, [_content_text(message.content, f"messages.{i}.content")]))
        return turns


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
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

"""The offline API: LLM(model=...).generate(prompts) and .chat(messages)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from radixserve.config import EMBEDDED_MODEL, EngineConfig
from radixserve.engine import LLMEngine
from radixserve.request import RequestOutput, choice_request_ids
from radixserve.sampling import SamplingParams

Message = dict[str, Any]


class LLM:
    """Generate text offline, batching all prompts through one engine.

    >>> llm = LLM()  # the embedded SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0))[0].text
    """

    def __init__(self, model: str = EMBEDDED_MODEL, **options: Any) -> None:
        """`model`: ModelConfig.source. `options`: any field of ModelConfig, CacheConfig or
        SchedulerConfig (radixserve/config.py documents each one and its default), e.g.
        device="cuda", num_blocks=512, enable_prefix_caching=False, policy="lpm"."""
        self.engine = LLMEngine(EngineConfig.from_options(source=model, **options))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """With a KV store (kv_store=...): write the prefix cache down and close the store, so a
        later LLM over the same store starts warm. `with LLM(...) as llm:` calls it."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """Build from an explicit EngineConfig (the CLI does this)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm.tokenizer = llm.engine.tokenizer
        return llm

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_namespace: str = "",
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order
        (with SamplingParams.n > 1: the n choices of each prompt in a row, `index` 0..n-1)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("give one SamplingParams, or one per prompt")
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = self.engine.add_request(prompt, params, cache_namespace=cache_namespace).request_id
                ids.extend(choice_request_ids(request_id, params.n))
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_namespace: str = "",
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or several, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, add_generation_prompt=True)) for c in conversations]
        return self.generate(prompts, sampling_params, cache_namespace=cache_namespace, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2)
        while pending:
            for output in self.engine.step():
                if output.finished and output.request_id in pending:
                    finished[output.request_id] = output
                    pending.discard(output.request_id)
                    bar.update(1)
        bar.close()
        return [finished[i] for i in ids]

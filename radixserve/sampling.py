"""SamplingParams and the sampler that turns logits into next tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from radixserve.errors import InvalidRequestError


# What torch.Generator.manual_seed accepts: a signed or unsigned 64-bit integer.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
MAX_N = 16  # choices per request (n): they share one prefill, then decode side by side

_SEED_STRIDE = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive choice indices apart


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed` (n > 1): choice 0 keeps the
    request's seed (so n=1 samples exactly as before), the others get distinct, reproducible ones."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _SEED_STRIDE) % 2**64


@dataclass(slots=True)
class TokenLogprob:
    """A sampled token's log probability under the model (before temperature and top-k/p, as
    vLLM reports it; after a grammar mask) and the `k` most likely tokens with theirs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: disabled
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    guided: Any = None  # a structured.GuidedSpec: the output must match it
    n: int = 1  # choices: independent samples that share the prompt's KV (one prefill)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError for values no API would accept."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise InvalidRequestError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise InvalidRequestError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {self.n!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Samples one token per row of logits, each row with its own parameters.

    Rows are handled one at a time: batches on CPU are small and per-request generators
    keep seeded requests reproducible regardless of what else is in the batch.
    """

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        request_ids: list[str],
        masks: tuple[list[int], torch.Tensor] | None = None,
    ) -> list[int]:
        """One token per row. `masks` = (rows, bitmask [len(rows), vocab/32]): those rows may
        only pick tokens whose bit is set (grammar-constrained requests). They are masked in
        place, so their logprobs afterwards are over the allowed tokens; other rows are not
        touched."""
        if masks is not None and masks[0]:
            from radixserve.structured import apply_bitmask

            rows, bitmask = masks
            with torch.inference_mode():  # the runner's logits are inference tensors
                index = torch.tensor(rows, device=logits.device)
                logits.index_copy_(0, index, apply_bitmask(logits.index_select(0, index), bitmask))
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        out = [0] * len(params)
        if greedy_rows:
            rows = logits if len(greedy_rows) == len(params) else logits[greedy_rows]
            picked = rows.argmax(dim=-1).tolist()
            for row, token in zip(greedy_rows, picked):
                out[row] = token
        for i, p in enumerate(params):
            if not p.greedy:
                out[i] = self._sample_row(logits[i].float(), p, request_ids[i])
        return out

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, params: SamplingParams, device: torch.device) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
            self._generators[request_id] = gen
        return gen

    def _sample_row(self, logits: torch.Tensor, params: SamplingParams, request_id: str) -> int:
        logits = logits / params.temperature
        if params.top_k > 0 and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(dim=-1)
            # keep the smallest set whose mass reaches top_p (always at least the top token)
            drop = cumulative - sorted_probs > params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, sorted_idx, sorted_probs)
        gen = self._generator(request_id, params, logits.device)
        return int(torch.multinomial(probs, 1, generator=gen).item())


def compute_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Logprobs of `tokens` (one per row in `rows`) and each row's top ks[i], from raw logits.
    Only the rows asking pay for the log-softmax."""
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1)).squeeze(1).tolist()
    k_max = max(ks)
    if k_max:
        top_values, top_ids = logp.topk(k_max, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out = []
    for i, (token, lp, k) in enumerate(zip(tokens, chosen, ks)):
        top = list(zip(top_ids[i][:k], top_values[i][:k])) if k else []
        out.append(TokenLogprob(token, lp, top))
    return out

"""SamplingParams and the sampler that turns logits into next tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixserve.errors import InvalidRequestError


# What torch.Generator.manual_seed accepts: a signed or unsigned 64-bit integer.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


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

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[str]) -> list[int]:
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

"""Grammar-constrained decoding: JSON schemas, Lark grammars and regexes, through llguidance.

Why llguidance (not xgrammar): it is a self-contained Rust wheel with no torch or Triton
dependency (xgrammar pulls in triton and transformers and pins torch builds), so it installs
next to CPU torch 2.13 as is; it builds its token trie straight from our `tokenizers` JSON;
it computes a mask lazily per step (tens of microseconds for JSON, no ahead-of-time
per-grammar compilation), and it takes JSON schemas, Lark (with inline `%json{...}`) and
regexes - the one engine behind vLLM's, SGLang's and llama.cpp's structured outputs.

A request's `SamplingParams.guided` is a `GuidedSpec`; the engine compiles it into a
`Guide` (one `LLMatcher` per request) when the request arrives. Each step:

    masks = guides.start_masks(rows)   # on a helper thread, while the model runs
    logits = runner.execute(...)
    tokens = sampler.sample(logits, ..., masks=masks.result())   # masks only the guided rows
    guide.advance(token)

Only guided rows pay: the mask is computed for them alone (llguidance drops the GIL, so it
overlaps the forward pass), and the sampler indexes those rows out, masks them and writes them
back; an unguided row's logits are never touched.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixserve.errors import InvalidRequestError

# Compact JSON (no free whitespace): a small model left free to emit whitespace may emit only
# that until max_tokens; with none allowed, every token carries content.
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(slots=True, frozen=True)
class GuidedSpec:
    """What the output must match. kind: "json_schema" (value: a schema dict), "json_object"
    (any JSON object), "lark" (a Lark grammar; may embed `%json{...}`) or "regex"."""

    kind: str
    value: Any = None

    def grammar(self) -> str:
        """The llguidance grammar text. Raises InvalidRequestError for a malformed spec."""
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
            except ValueError as e:
                raise InvalidRequestError(f"invalid JSON schema: {e}") from None
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        raise InvalidRequestError(f"unknown guided decoding kind {self.kind!r}")


def check_grammar(spec: GuidedSpec) -> None:
    """Raise InvalidRequestError when llguidance cannot compile `spec` (no tokenizer needed)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(spec.grammar())
    if error:
        raise InvalidRequestError(f"the {spec.kind.replace('_', ' ')} cannot be used to constrain output: {error}")


class Guide:
    """One request's grammar state: which tokens may come next, advanced by each sampled token."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def advance(self, token_id: int) -> bool:
        """Feed the sampled token; False if the grammar rejected it (cannot happen for a token
        drawn under this guide's mask, except EOS after the grammar already stopped)."""
        if self.matcher.is_stopped():
            return True
        return bool(self.matcher.consume_token(token_id))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (the next token can only be EOS)."""
        return self.matcher.is_stopped()


class GuideFactory:
    """Compiles GuidedSpecs into Guides for one tokenizer, and computes their masks."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer = None  # built on first use: ~0.3 s for a 50k vocabulary
        self._pool: ThreadPoolExecutor | None = None

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(
                self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=sorted(self.tokenizer.eos_token_ids)
            )
        return self._ll_tokenizer

    @property
    def num_mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def compile(self, spec: GuidedSpec) -> Guide:
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, spec.grammar(), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"the {spec.kind.replace('_', ' ')} cannot be used: {matcher.get_error()}")
        return Guide(matcher)

    def start_masks(self, guides: list[Guide]) -> Future:
        """Compute the allowed-token bitmask of each guide ([len(guides), words] int32) on a
        helper thread; the result is ready by the time the forward pass ends."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radixserve-grammar")
        return self._pool.submit(self._masks, guides)

    def _masks(self, guides: list[Guide]) -> torch.Tensor:
        bitmask = torch.full((len(guides), self.num_mask_words), -1, dtype=torch.int32)
        row_bytes = self.num_mask_words * 4
        for i, guide in enumerate(guides):
            guide.matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
        return bitmask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [n, vocab] with every token whose bit is 0 set to -inf (a new tensor). The bits
    are unpacked by numpy (one pass over vocab/8 bytes per row, cheaper than torch's shifts)."""
    vocab = logits.shape[-1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    disallowed = torch.from_numpy(bits) == 0
    return logits.masked_fill(disallowed.to(logits.device), float("-inf"))


def schema_json(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"))

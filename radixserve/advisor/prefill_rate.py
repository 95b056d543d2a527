"""Measure how fast the model prefills, to turn saved prefill tokens into saved TTFT."""

from __future__ import annotations

import random
from typing import Any

from radixserve.config import CacheConfig, EngineConfig, SchedulerConfig


def measure_prefill_rate(loaded: Any, num_tokens: int = 512, repeats: int = 2, seed: int = 0) -> float:
    """Prompt tokens per second for one uncached ``num_tokens``-token prompt (best of ``repeats``).

    Runs the real engine (prefix caching off, so every run computes the whole prompt) on random
    token ids after a short warm-up. Prefill cost grows a little faster than linearly with length
    (attention), so measure near the log's typical prompt length.
    """
    from radixserve.engine import LLMEngine
    from radixserve.sampling import SamplingParams

    num_tokens = max(16, min(num_tokens, (loaded.max_model_len or num_tokens + 1) - 1))
    block_size = 16
    # The engine takes the weights, dtype and device from `loaded`; the config sizes the pool.
    config = EngineConfig(
        cache=CacheConfig(
            block_size=block_size, num_blocks=-(-(num_tokens + 1) // block_size) + 1, enable_prefix_caching=False
        ),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=max(num_tokens, 2048)),
    )
    engine = LLMEngine(config, loaded=loaded)
    rng = random.Random(seed)
    vocab = min(loaded.arch.vocab_size, loaded.tokenizer.vocab_size)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    best = float("inf")
    for run in range(repeats + 1):
        n = 32 if run == 0 else num_tokens  # run 0 warms up kernels and allocators
        ids = [rng.randrange(vocab) for _ in range(n)]
        engine.add_request(ids, params, request_id=f"prefill-rate-{run}")
        ttft = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    ttft = out.metrics.time_to_first_token
        if run > 0 and ttft:
            best = min(best, ttft)
    return num_tokens / best if best != float("inf") else 0.0


"""Host cost of an engine step, with the model replaced by a no-op (CPU): what the scheduler, the
step record, sampling and post-processing cost per decode step, without the forward pass.

    PYTHONPATH=. python3 bench/bench_host_step.py [BATCH]        (default 32)

Run it from two trees (e.g. a `git archive` of the old one) to compare their host paths. Each of
BATCH requests has a 1024-token prompt (dummy:tiny weights) and decodes with ignore_eos; the
figure is the best of 5 rounds of 40 decode steps.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.engine import LLMEngine
from radixserve.sampling import SamplingParams


def main(batch: int) -> None:
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32"),
        cache=CacheConfig(num_blocks=8192, block_size=16),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=65536),
    ))
    # a near-free model: preallocated hidden states and 16-wide logits
    hidden, logits = torch.zeros(70000, 8), torch.zeros(70000, 16) + torch.arange(16.0)
    model = engine.loaded.model
    model.forward = lambda input_ids, *args, **kwargs: hidden[: input_ids.shape[0]]
    model.compute_logits = lambda h, *args, **kwargs: logits[: h.shape[0]]
    rng = random.Random(0)
    for _ in range(batch):
        prompt = [rng.randrange(3, 200) for _ in range(1024)]
        engine.add_request(prompt, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for _ in range(5):  # the prefills, then all decoding
        engine.step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(40):
            engine.step()
        best = min(best, (time.perf_counter() - t0) / 40)
    print(f"batch {batch}: host {best * 1e6:.0f} us per decode step (best of 5 x 40 steps)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)

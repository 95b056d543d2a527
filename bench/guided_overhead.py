"""What grammar-constrained rows cost a batch, on the embedded model (CPU).

Decodes a batch of free (unconstrained) greedy requests alone, then the same batch with guided
(json_schema) requests beside them, and reports the mean engine step time of each, plus the
parts only guided rows pay: the mask computation (on a helper thread, overlapping the forward
pass) and applying it in the sampler. The free requests' tokens are checked to be identical.

    PYTHONPATH=. python bench/guided_overhead.py [--free 8] [--guided 2] [--tokens 48] [--write]

--write replaces the section `guided-overhead` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from radixserve.config import CacheConfig, EngineConfig, ModelConfig
from radixserve.engine import LLMEngine
from radixserve.sampling import Sampler, SamplingParams
from radixserve.structured import GuidedSpec

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["name", "qty"]}}}, "required": ["items"]}
PROMPT = "<|im_start|>user\nList what to buy for a picnic, as JSON.<|im_end|>\n<|im_start|>assistant\n"


def run(engine: LLMEngine, free: int, guided: int, tokens: int) -> tuple[list[float], dict]:
    for i in range(free):
        engine.add_request(PROMPT + f"({i})", SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                           request_id=f"free-{i}")
    for i in range(guided):
        engine.add_request(PROMPT + f"[{i}]", SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                                             guided=GuidedSpec("json_schema", SCHEMA)),
                           request_id=f"guided-{i}")
    steps, outs = [], {}
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        steps.append(time.perf_counter() - t)
    return steps[2:], outs  # drop the prefill steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--free", type=int, default=8)
    ap.add_argument("--guided", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the section guided-overhead of docs/benchmarks.md")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(num_blocks=512, enable_prefix_caching=False)))
    run(engine, 1, 1, 4)  # warm-up (and builds the grammar tokenizer once)
    alone, mixed = [], []
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        a, free_outs = run(engine, args.free, 0, args.tokens)
        b, mixed_outs = run(engine, args.free, args.guided, args.tokens)
        alone += a
        mixed += b
        assert all(free_outs[k].token_ids == mixed_outs[k].token_ids for k in free_outs)
    guide = engine.guide_factory.compile(GuidedSpec("json_schema", SCHEMA))
    t = time.perf_counter()
    n = 200
    for _ in range(n):
        engine.guide_factory._masks([guide])
    mask_us = (time.perf_counter() - t) / n * 1e6
    logits = torch.randn(args.free + args.guided, engine.loaded.arch.vocab_size)
    params = [SamplingParams(temperature=0)] * logits.shape[0]
    ids = [str(i) for i in range(logits.shape[0])]
    bitmask = engine.guide_factory._masks([guide] * args.guided)
    sampler = Sampler()

    def timed(masks) -> float:
        t = time.perf_counter()
        for _ in range(n):
            sampler.sample(logits.clone(), params, ids, masks)
        return (time.perf_counter() - t) / n * 1e6

    plain_us = timed(None)
    masked_us = timed((list(range(args.guided)), bitmask))
    lines = [
        "| measurement | value |",
        "|---|---|",
        f"| decode step, {args.free} free requests alone (median) | {statistics.median(alone) * 1e3:.1f} ms |",
        f"| decode step, {args.free} free + {args.guided} guided json_schema requests (median) | "
        f"{statistics.median(mixed) * 1e3:.1f} ms |",
        f"| mask computation, one guided row (helper thread, overlaps the forward pass) | {mask_us:.0f} us |",
        f"| sampler over {logits.shape[0]} rows, none masked | {plain_us:.0f} us |",
        f"| sampler over {logits.shape[0]} rows, {args.guided} masked | {masked_us:.0f} us |",
        "| free requests' tokens with and without guided neighbours | identical |",
    ]
    print("\n".join(lines))
    if args.write:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.report import update_section

        update_section("guided-overhead", "CPU: what grammar-constrained rows cost a batch", "\n".join(lines) + (
            "\n\nOnly guided rows pay: their masks are computed beside the forward pass and applied to their "
            "rows alone; the free rows' logits are never touched, so their tokens are identical. Absolute "
            "times swing with the machine's load (see the load average above); compare rows of one run."))

if __name__ == "__main__":
    main()

"""What --deterministic costs on CPU, and what it fixes: the embedded model (fp32), default and
deterministic engines over the same weights, measured interleaved in one run:

    .venv/bin/python bench/bench_deterministic_cpu.py [--repeats 3] [--write]

1. speed: cold prefill of 512 tokens (TTFT), decode at batch 1 (per token) and at batch 8 (per
   step), medians over interleaved repeats (default, deterministic, default, ...);
2. bitwise: the logits of one prompt's 8 greedy tokens run alone vs run in a batch with 7
   other requests, and with its prefix cached: equal in how many of the 8 positions.

--write puts the "cpu-deterministic" section into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402


def engine(loaded, deterministic: bool, caching: bool = False) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(source="embedded", show_progress=False, deterministic=deterministic),
        cache=CacheConfig(num_blocks=512, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048),
    )
    e = LLMEngine(config, loaded=loaded)
    e.captured = {}
    postprocess = e._postprocess

    def capture(scheduled, sampling, logits, pending):  # the logits the sampler sees
        for i, r in enumerate(sampling):
            e.captured.setdefault(r.request_id, []).append(logits[i].clone())
        return postprocess(scheduled, sampling, logits, pending)

    e._postprocess = capture
    return e


def run(e: LLMEngine) -> None:
    while e.has_unfinished_requests():
        e.step()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def speed(loaded, deterministic: bool, rng: random.Random) -> dict:
    vocab = loaded.arch.vocab_size
    e = engine(loaded, deterministic)
    req = e.add_request([rng.randrange(3, vocab) for _ in range(512)], greedy(1))
    run(e)
    prefill = req.first_token_time - req.arrival_time
    req = e.add_request([rng.randrange(3, vocab) for _ in range(64)], greedy(17))
    run(e)
    decode1 = (req.finish_time - req.first_token_time) / 16
    reqs = [e.add_request([rng.randrange(3, vocab) for _ in range(64)], greedy(17)) for _ in range(8)]
    run(e)
    decode8 = statistics.median((r.finish_time - r.first_token_time) / 16 for r in reqs)
    return {"prefill_512_ms": prefill * 1000, "decode_b1_ms": decode1 * 1000, "decode_b8_ms": decode8 * 1000}


def bitwise(loaded, deterministic: bool) -> dict:
    tok = loaded.tokenizer
    prompt = tok.encode("You are a careful travel assistant. Answer briefly and cite the country. " * 3)
    alone = engine(loaded, deterministic)
    alone.add_request(prompt, greedy(8), request_id="t")
    run(alone)
    batched = engine(loaded, deterministic)
    for i in range(4):
        batched.add_request(tok.encode(f"Tell me about {i} dragons. " * (i + 1)), greedy(12), request_id=f"o{i}")
    batched.step()
    batched.add_request(prompt, greedy(8), request_id="t")
    for i in range(3):
        batched.add_request(tok.encode(f"Write {i} haiku. " * (2 * i + 1)), greedy(3), request_id=f"p{i}")
    run(batched)
    cached = engine(loaded, deterministic, caching=True)
    cached.add_request(prompt[:40] + [7, 7, 7], greedy(1), request_id="w")
    run(cached)
    cached.add_request(prompt, greedy(8), request_id="t")
    run(cached)

    def same(e):
        return sum(torch.equal(a, b) for a, b in zip(alone.captured["t"], e.captured["t"]))

    return {"batched": same(batched), "cached": same(cached), "positions": len(alone.captured["t"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(source="embedded", show_progress=False))
    rng = random.Random(0)
    runs = {False: [], True: []}
    speed(loaded, False, rng)  # warm-up
    for _ in range(args.repeats):
        for det in (False, True):
            runs[det].append(speed(loaded, det, rng))
            print(det, runs[det][-1], flush=True)
    med = {det: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for det, rs in runs.items()}
    exact = {det: bitwise(loaded, det) for det in (False, True)}
    print(json.dumps({"median": {str(k): v for k, v in med.items()}, "bitwise": {str(k): v for k, v in exact.items()}}, indent=1))
    labels = {"prefill_512_ms": "cold prefill, 512 tokens (TTFT)", "decode_b1_ms": "decode, batch 1 (per token)",
              "decode_b8_ms": "decode, batch 8 (per token of each request)"}  # fmt: skip
    rows = [[labels[k], f"{med[False][k]:.1f} ms", f"{med[True][k]:.1f} ms", f"{med[True][k] / med[False][k]:.2f}x"] for k in labels]
    n = exact[False]["positions"]
    body = (
        f"Embedded SmolLM2-135M, fp32, {torch.get_num_threads()} threads; medians of {args.repeats} interleaved repeats "
        "(default, deterministic, default, ...) after a warm-up.\n\n"
        + markdown_table(["workload", "default", "--deterministic", "ratio"], rows)
        + "\n\nBitwise-equal logits of one prompt's 8 greedy positions, against the prompt run alone:\n\n"
        + markdown_table(
            ["mode", "in a batch of 8 (mixed prefill + decode)", "over a cached 32-token prefix"],
            [[m, f"{exact[d]['batched']}/{n}", f"{exact[d]['cached']}/{n}"] for m, d in (("default", False), ("--deterministic", True))],
        )
    )
    if args.write:
        update_section("cpu-deterministic", "CPU: what --deterministic costs and fixes", body)
    print(body)


if __name__ == "__main__":
    main()

"""CPU benchmarks of the engine on the embedded model, written to docs/benchmarks.md.

    .venv/bin/python bench/bench_cpu_engine.py [--repeats 5]

1. prefill and decode tokens/s, radixserve vs transformers (same weights, same prompt, same run);
2. the classic prefix-cache case: a ~2000-token system prompt shared by ~20-token questions,
   cold vs cached time to first token;
3. an interleaved workload of 4 system prompts: the prefix-cache hit rate.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.model.reference import transformers_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

WORDS = (
    "the of and to in is was for on that with as by at from this are be it an which or have has not "
    "their more other were all its been can into time when only new some these two may first after "
    "system policy customer order account request answer document section model cache token server "
    "travel hotel price museum river mountain harbour ticket station market library garden bridge"
).split()


def synthetic_text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < num_words:
        n = rng.randint(6, 16)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        words += n
    return " ".join(sentences)


def make_engine(loaded, caching: bool) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(show_progress=False),
        cache=CacheConfig(num_blocks=2048, enable_prefix_caching=caching),
    )
    return LLMEngine(config, loaded=loaded)


def time_to_first_token(engine: LLMEngine, prompt: list[int]) -> float:
    request = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    return request.first_token_time - request.arrival_time


def decode_seconds_per_token(engine: LLMEngine, prompt: list[int], n: int) -> float:
    request = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return (request.finish_time - request.first_token_time) / (n - 1)


@torch.inference_mode()
def hf_prefill_seconds(hf, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    hf(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


@torch.inference_mode()
def hf_decode_seconds_per_token(hf, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    out = hf(ids, use_cache=True, logits_to_keep=1)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(n - 1):
        out = hf(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / (n - 1)


def bench_vs_transformers(loaded, repeats: int) -> str:
    hf = transformers_model(loaded.model)
    engine = make_engine(loaded, caching=False)
    rows = []
    for length in (128, 512, 1024):
        prompt = loaded.tokenizer.encode(synthetic_text(length, seed=length))[:length]
        ours = [time_to_first_token(engine, prompt) for _ in range(repeats + 1)][1:]
        theirs = [hf_prefill_seconds(hf, prompt) for _ in range(repeats + 1)][1:]
        o, t = statistics.median(ours), statistics.median(theirs)
        rows.append([f"prefill {length} tokens", f"{length / o:,.0f} tok/s", f"{length / t:,.0f} tok/s", f"{t / o:.2f}x"])
    prompt = loaded.tokenizer.encode(synthetic_text(128, seed=7))[:128]
    n = 64
    ours = [decode_seconds_per_token(engine, prompt, n) for _ in range(repeats)]
    theirs = [hf_decode_seconds_per_token(hf, prompt, n) for _ in range(repeats)]
    o, t = statistics.median(ours), statistics.median(theirs)
    rows.append([f"decode, batch 1, {n} tokens after 128", f"{1 / o:,.0f} tok/s", f"{1 / t:,.0f} tok/s", f"{t / o:.2f}x"])
    table = markdown_table(["workload", "radixserve", "transformers (fp32, sdpa)", "speedup"], rows)
    return (
        f"Embedded SmolLM2-135M-Instruct, fp32, one request at a time, prefix caching off; medians of "
        f"{repeats} runs after a warm-up. radixserve's prefill time is its time to first token through the "
        f"whole engine (scheduler, runner, sampler); transformers' is one forward with a KV cache.\n\n{table}"
    )


def bench_prefix_cache(loaded, repeats: int, rounds: int) -> str:
    tok = loaded.tokenizer
    system = synthetic_text(1700, seed=1)
    system_ids = tok.encode(system)[:2000]
    questions = [tok.encode(f" Question {i}: what does section {i} say about the {WORDS[i]}?")[:20] for i in range(40)]

    cold_engine = make_engine(loaded, caching=False)
    warm_engine = make_engine(loaded, caching=True)
    time_to_first_token(warm_engine, system_ids + questions[0])  # fills the cache
    cold, warm = [], []
    for q in questions[1 : repeats * 2 + 2]:
        cold.append(time_to_first_token(cold_engine, system_ids + q))
        warm.append(time_to_first_token(warm_engine, system_ids + q))
    c, w = statistics.median(cold), statistics.median(warm)
    classic = markdown_table(
        ["prompt", "cold TTFT (cache off)", "cached TTFT", "ratio"],
        [[f"{len(system_ids)} shared + ~{len(questions[1])} new tokens", f"{c * 1000:.1f} ms", f"{w * 1000:.1f} ms", f"{c / w:.1f}x faster (cached = 1/{c / w:.0f} of cold)"]],
    )

    # four system prompts interleaved, `rounds` questions each, round robin
    engine = make_engine(loaded, caching=True)
    systems = [tok.encode(synthetic_text(700, seed=100 + s))[:800] for s in range(4)]
    ceiling_hits, seen = 0, set()  # what a cache that never evicts would reuse: earlier prompts' full blocks
    for i in range(rounds):
        for s, sys_ids in enumerate(systems):
            prompt = sys_ids + questions[i % len(questions)]
            time_to_first_token(engine, prompt)
            reusable = 0
            while reusable + 16 <= len(prompt) - 1 and tuple(prompt[: reusable + 16]) in seen:
                reusable += 16
            ceiling_hits += reusable
            seen.update(tuple(prompt[:end]) for end in range(16, len(prompt) + 1, 16))
    snap = engine.snapshot()
    interleaved = markdown_table(
        ["workload", "requests", "prompt tokens", "reused tokens", "hit rate", "ceiling"],
        [[f"4 system prompts (800 tokens) x {rounds} questions, round robin", engine.stats.finished_requests,
          snap.prefix_cache_queries, snap.prefix_cache_hits, f"{snap.prefix_cache_hit_rate:.1%}",
          f"{ceiling_hits / snap.prefix_cache_queries:.1%}"]],
    )  # fmt: skip
    return (
        f"Embedded model, fp32, block size 16. Cold and cached requests alternate (medians of {len(cold)}).\n\n"
        f"{classic}\n\n{interleaved}\n\nThe hit rate counts every prompt token looked up, the first (cold) "
        "request of each system prompt included; the ceiling is what a cache that never evicts could reuse "
        "(the longest run of 16-token blocks each prompt shares with an earlier one, its last token excluded)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--rounds", type=int, default=20, help="questions per system prompt in the interleaved workload")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(show_progress=False))
    if not args.skip_transformers:
        body = bench_vs_transformers(loaded, args.repeats)
        print(body)
        update_section("cpu-engine-vs-transformers", "CPU: prefill and decode vs transformers", body)
    body = bench_prefix_cache(loaded, args.repeats, args.rounds)
    print(body)
    update_section("cpu-prefix-cache", "CPU: prefix cache, cold vs cached time to first token", body)


if __name__ == "__main__":
    main()

"""CPU benchmark of the storage tier (issue #13), embedded model, one run:

    PYTHONPATH=. .venv/bin/python bench/bench_tiers.py [--prompts 16] [--prompt-tokens 2000]
        [--rounds 2] [--pool-prompts 4] [--write-docs]

1. Working set larger than the device pool: `--prompts` system prompts of `--prompt-tokens`
   tokens, requests round robin (`--rounds` times each, every request a fresh 16-token
   question after its system prompt, one output token), a device pool that holds
   `--pool-prompts` of them. Two engines side by side, the same request sent to one then the
   other (so load on the machine hits both alike): device pool only vs device + disk tier.
   Hit rate (cached / prompt tokens) and TTFT p50 over the rounds after the first.
2. Restart: a `--prompt-tokens` prefix computed by one engine, which closes (its tree is
   written to disk); a new engine over the same directory serves prefix + 16 new tokens
   (TTFT), vs a cold engine (no store), alternating, `--restart-repeats` times.

Prints a JSON summary; --write-docs writes the "tiers-cpu" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

QUESTION_TOKENS = 16


def engine(loaded, num_blocks: int, kv_store: str | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(show_progress=False),
        cache=CacheConfig(num_blocks=num_blocks, kv_store=kv_store, kv_store_gb=8.0),
        scheduler=SchedulerConfig(max_num_batched_tokens=4096),
    ), loaded=loaded)


def serve(e: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """(TTFT in seconds, cached tokens) of one request served alone."""
    req = e.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while e.has_unfinished_requests():
        e.step()
    return req.first_token_time - req.arrival_time, req.num_cached_tokens or 0


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


def working_set(loaded, args) -> dict:
    rng = random.Random(0)
    systems = [rand_ids(rng, args.prompt_tokens) for _ in range(args.prompts)]
    blocks_per_request = -(-(args.prompt_tokens + QUESTION_TOKENS + 1) // 16)
    num_blocks = args.pool_prompts * blocks_per_request + 2
    with tempfile.TemporaryDirectory(prefix="bench-tiers-") as store_dir:
        engines = {"device only": engine(loaded, num_blocks), "device + disk": engine(loaded, num_blocks, f"disk:{store_dir}")}
        stats = {name: {"ttft": [], "cached": 0, "prompt": 0} for name in engines}
        for rnd in range(args.rounds):
            for i, system in enumerate(systems):
                prompt = system + rand_ids(rng, QUESTION_TOKENS)
                for name, e in engines.items():
                    t, cached = serve(e, prompt)
                    if rnd > 0:  # the first round is cold for both
                        stats[name]["ttft"].append(t)
                        stats[name]["cached"] += cached
                        stats[name]["prompt"] += len(prompt)
                print(f"round {rnd} prompt {i}: " + ", ".join(
                    f"{n} {s['ttft'][-1] * 1000:.0f} ms" for n, s in stats.items() if s["ttft"]), flush=True)
        tiers = engines["device + disk"].snapshot().tiers
        for e in engines.values():
            e.close()
    out = {"num_blocks": num_blocks, "requests_measured": len(stats["device only"]["ttft"])}
    for name, s in stats.items():
        out[name] = {"hit_rate": s["cached"] / s["prompt"], "ttft_p50_ms": statistics.median(s["ttft"]) * 1000}
    base = out["device only"]["hit_rate"]
    out["hit_rate_ratio"] = out["device + disk"]["hit_rate"] / base if base else None  # None: from 0
    out["ttft_p50_speedup"] = out["device only"]["ttft_p50_ms"] / out["device + disk"]["ttft_p50_ms"]
    out["tier_hit_tokens"] = tiers.hit_tokens
    out["load_decisions"] = tiers.decisions
    return out


def warm_up(e: LLMEngine) -> LLMEngine:
    """A started server has run a forward already: so do both sides of the restart comparison."""
    serve(e, rand_ids(random.Random(99), 32))
    return e


def restart(loaded, args) -> dict:
    rng = random.Random(1)
    prefix = rand_ids(rng, args.prompt_tokens)
    num_blocks = 2 * -(-(args.prompt_tokens + QUESTION_TOKENS + 1) // 16) + 2
    warm, cold = [], []
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as store_dir:
        first = engine(loaded, num_blocks, f"disk:{store_dir}")
        serve(first, prefix + rand_ids(rng, QUESTION_TOKENS))
        first.close()
        for _ in range(args.restart_repeats):
            restarted = warm_up(engine(loaded, num_blocks, f"disk:{store_dir}"))  # a new process's engine
            t, cached = serve(restarted, prefix + rand_ids(rng, QUESTION_TOKENS))
            restarted.close()
            assert cached >= args.prompt_tokens // 16 * 16 - 16, cached
            warm.append(t)
            t, _ = serve(warm_up(engine(loaded, num_blocks)), prefix + rand_ids(rng, QUESTION_TOKENS))
            cold.append(t)
            print(f"restart: from disk {warm[-1] * 1000:.0f} ms, cold {cold[-1] * 1000:.0f} ms", flush=True)
    w, c = statistics.median(warm), statistics.median(cold)
    return {"from_disk_ttft_ms": w * 1000, "cold_ttft_ms": c * 1000, "ratio": w / c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool-prompts", type=int, default=4)
    parser.add_argument("--restart-repeats", type=int, default=3)
    parser.add_argument("--only", choices=["working-set", "restart"], default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(show_progress=False))
    result = {}
    if args.only != "restart":
        result["working_set"] = working_set(loaded, args)
    if args.only != "working-set":
        result["restart"] = restart(loaded, args)
    print(json.dumps(result, indent=2))
    if args.write_docs and args.only is None:
        ws, rs = result["working_set"], result["restart"]
        body = (
            f"{args.prompts} system prompts of {args.prompt_tokens} tokens, round robin x {args.rounds}, a device pool "
            f"of {ws['num_blocks']} blocks ({args.pool_prompts} prompts); the two engines serve the same request one "
            f"after the other; figures over rounds 2+ ({ws['requests_measured']} requests each).\n\n"
            + markdown_table(["engine", "hit rate", "TTFT p50"], [
                [name, f"{ws[name]['hit_rate']:.2f}", f"{ws[name]['ttft_p50_ms']:.0f} ms"]
                for name in ("device only", "device + disk")])
            + "\n\nWith the disk tier: hit rate "
            + (f"x{ws['hit_rate_ratio']:.1f}" if ws["hit_rate_ratio"] else "from 0 (LRU evicts every prompt before its turn)")
            + f", TTFT p50 x{ws['ttft_p50_speedup']:.1f} "
            f"faster (aims: >= 3x each). Tier hits (tokens): {ws['tier_hit_tokens']}; decisions {ws['load_decisions']}.\n\n"
            f"Restart: a {args.prompt_tokens}-token prefix + 16 new tokens served by a new engine over the previous "
            f"engine's disk store: TTFT {rs['from_disk_ttft_ms']:.0f} ms vs {rs['cold_ttft_ms']:.0f} ms cold, "
            f"ratio {rs['ratio']:.2f} (aim <= 0.2), medians of {args.restart_repeats}."
        )
        update_section("tiers-cpu", "Tiered prefix cache on CPU (storage tier, restart)", body)


if __name__ == "__main__":
    main()

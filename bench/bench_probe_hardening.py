"""What the issue-16 trust features cost, on CPU: probe hardening, cache reports, quotas, shared prefixes.

    .venv/bin/python bench/bench_probe_hardening.py [--trials 8] [--floor 3.0] [--prompt-tokens 64]

Writes the section `trust-cpu` of docs/benchmarks.md:
1. --shared-ttft-floor: the isolation audit (CI's settings) against a shared cache without and
   with the floor, side by side in one run: what the floor hides (timing) and what it does not
   (usage.cached_tokens), and what it costs every request (hit and miss TTFT);
2. --probe-rate-limit: the limiter's check per request, and a request's latency over HTTP with
   and without it (same server settings otherwise, alternating);
3. cache bookkeeping (no model): admission with and without a cache report, a flood through a
   full pool with and without the ghost index and a tenant quota, as ratios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_isolation import KEY_A, KEY_B, ms, serve, tenant  # noqa: E402
from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.text import TextGenerator  # noqa: E402
from radixserve.cache.manager import KVCacheManager  # noqa: E402
from radixserve.config import ModelConfig  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.security.audit import AuditConfig, run_audit  # noqa: E402
from radixserve.server import ServerConfig  # noqa: E402
from radixserve.server.probe_guard import ProbeRateLimiter  # noqa: E402
from tests.cache.manager_helpers import run_request  # noqa: E402


def floor_audit(loaded, args) -> list[list[object]]:
    rows = []
    for label, floor in (("shared, no floor", 0.0), (f"shared, --shared-ttft-floor {args.floor:g}", args.floor)):
        config = ServerConfig(api_keys=[KEY_A, KEY_B], shared_ttft_floor=floor)
        with serve(loaded, config, num_blocks=512) as (url, _):
            r = run_audit(AuditConfig(base_url=url, victim_key=KEY_A, attacker_key=KEY_B, trials=args.trials,
                                      prompt_tokens=args.prompt_tokens, warmup=1, alpha=0.001))
        rows.append([label, ms(r.hit_ttfts), ms(r.miss_ttfts), f"{r.ks_statistic:.2f}", f"{r.pvalue:.2g}",
                     "yes" if r.timing_leak else "no", f"{r.oracle_trials}/{r.trials}", f"{r.seconds:.0f} s"])
    return rows


def limiter_cost(loaded, text: TextGenerator, rounds: int) -> list[list[object]]:
    limiter = ProbeRateLimiter(per_minute=1e9)
    reps = 20000
    start = time.perf_counter()
    for i in range(reps):
        limiter.charge(f"key{i % 8}")
    check_us = (time.perf_counter() - start) / reps * 1e6
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    configs = {"off": ServerConfig(api_keys=[KEY_A]), "on": ServerConfig(api_keys=[KEY_A], probe_rate_limit=1e9)}
    for _ in range(rounds):
        for label in ("off", "on"):  # alternating, so load drifts hit both alike
            with serve(loaded, configs[label], num_blocks=256) as (url, _):
                client = tenant(url, KEY_A)
                client.send("embedded", "warm up")
                prompt = text.text(16)
                for _ in range(5):
                    start = time.perf_counter()
                    client.send("embedded", prompt)
                    latencies[label].append(time.perf_counter() - start)
                client.close()
    off, on = statistics.median(latencies["off"]), statistics.median(latencies["on"])
    return [["limiter check (in process)", f"{check_us:.2f} us", ""],
            ["short request over HTTP, limiter off", f"{off * 1000:.0f} ms", "1.00"],
            ["short request over HTTP, limiter on", f"{on * 1000:.0f} ms", f"{on / off:.2f}"]]


def bookkeeping_cost(num_requests: int) -> list[list[object]]:
    rng = random.Random(3)
    shared = [rng.randrange(50000) for _ in range(512)]
    prompts = [shared[: rng.randrange(16, 512)] + [rng.randrange(50000) for _ in range(rng.randrange(16, 1024))]
               for _ in range(num_requests)]
    tenants = [f"key:{rng.randrange(8)}" for _ in prompts]
    variants = {
        "baseline (no report, no ghost index, no quota)": dict(ghost=0, quota=None, report=False),
        "ghost index 4096 blocks": dict(ghost=4096, quota=None, report=False),
        "ghost index + a cache report on every request": dict(ghost=4096, quota=None, report=True),
        "tenant quota 256 blocks (8 tenants, 1024-block pool)": dict(ghost=0, quota=256, report=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for label, v in variants.items():  # interleaved repetitions, best of 3
            cache = KVCacheManager(num_blocks=1024, block_size=16, model_key="m", ghost_index_blocks=v["ghost"],
                                   tenant_quota_blocks=v["quota"])
            start = time.perf_counter()
            for i, (prompt, ns) in enumerate(zip(prompts, tenants)):
                run_request(cache, f"r{i}", prompt, ns, cache_report=v["report"])
            times[label].append(time.perf_counter() - start)
    base = min(times["baseline (no report, no ghost index, no quota)"])
    return [[label, f"{min(t) / num_requests * 1e6:.0f} us", f"{min(t) / base:.2f}"] for label, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--floor", type=float, default=3.0)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="audit prompt length (its misses should "
                        "take less than the floor, or the floor hides nothing)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="write to this markdown file instead")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(source="embedded", show_progress=False))
    text = TextGenerator(random.Random(11))
    book = bookkeeping_cost(args.requests)
    lim = limiter_cost(loaded, text, args.rounds)
    aud = floor_audit(loaded, args)
    body = f"""Embedded SmolLM2-135M, fp32, block size 16, one request at a time over HTTP.

**TTFT floor** against the isolation audit (`--trials {args.trials} --prompt-tokens {args.prompt_tokens} --alpha 0.001`),
keys sharing one cache, without and with the floor, in the same run. The floor holds every
request reading the shared cache, hits and misses, until {args.floor:g} s after arrival.

{markdown_table(["server", "hit-probe TTFT", "miss-probe TTFT", "KS D", "p", "timing leak", "cached_tokens oracle", "audit run time"], aud)}

**Probe rate limit.** The check per request, and a short request's latency with the limiter on
(a budget it never reaches) vs off, {args.rounds} alternating rounds of 5 requests.

{markdown_table(["what", "median", "ratio to off"], lim)}

**Cache bookkeeping** (no model: {args.requests} requests of 32-1536 tokens sharing prefixes,
8 tenants, a 1024-block pool that evicts all along; best of 3 interleaved runs).

{markdown_table(["variant", "per request", "ratio to baseline"], book)}
"""
    kwargs = {"path": args.out} if args.out else {}
    update_section("trust-cpu", "CPU: what probe hardening, cache reports, quotas cost", body, **kwargs)
    print(body)


if __name__ == "__main__":
    main()

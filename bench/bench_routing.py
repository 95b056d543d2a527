"""Routers side by side, each deployed as users run it: `radixserve serve --replicas`, same requests.

    .venv/bin/python bench/bench_routing.py [--requests 160] [--system-prompts 8] [--prompts-per-pool 4 5]
        [--with-store-runs] [--serve-opt NAME=VALUE] [--arrival round-robin|shuffled]

Every configuration is a fresh `radixserve serve --replicas N --router R` in its own process (its
own local Ray, the engine replicas, and that process's own HTTP ingress: one Ray hop per request,
docs/scaling.md), with the same engine options; this process only sends the requests:
  single           one replica taking all traffic, with both replicas' KV pools and all the CPUs
                   (equal memory and compute: the ceiling, every prompt's first request misses)
  pow2             --replicas (2), Ray Serve's default power-of-two-choices router
  prefix-affinity  --replicas (2), Ray Serve LLM's PrefixCacheAffinityRouter (guesses from prompt text)
  cache-aware      --replicas (2), ours (KV-event prefix index)
Workload: `system-prompt` with N system prompts x M questions, arriving mixed (round robin, or --arrival shuffled),
closed loop with --concurrency clients, or open loop with --request-rate (Poisson arrivals, as independent users
send them). A replica's KV pool holds exactly its share of the system prompts (--prompts-per-pool,
default N / replicas; what makes routing matter: a replica that sees every prompt thrashes) plus room for the
requests in flight. Further --prompts-per-pool sizes repeat pow2 and
ours there, so the default reads as one point of the curve (bench_routing_sim.py sweeps it).
--with-store-runs repeats pow2 and ours with a shared Redis tier (--kv-store): this bench starts
its own redis-server on a free loopback port (emptied before each run) unless --serve-opt names
a kv_store. Blocks loaded from it count as cached (they are in usage.cached_tokens; the column
"from store" is the storage tier's share, from the replicas' radixserve_tier_hit_tokens).
What routing adds per request is bench_routing_overhead.py's (section routing-overhead).
Writes the section `routing-cpu` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.loadgen import LoadConfig, run_load_sync  # noqa: E402
from radixserve.benchmark.results import summarize  # noqa: E402
from radixserve.benchmark.workloads import SystemPromptWorkload  # noqa: E402
from tests.live_server import wait_until_healthy  # noqa: E402
from tests.redis_server import RedisServer, find_redis_server, free_port  # noqa: E402

BLOCK_SIZE = 16


def replica_counters(base: str) -> dict[str, float]:
    """From the routed /metrics: finished requests per replica, the router's decisions, and the
    prompt tokens the replicas loaded from the storage tier."""
    text = httpx.get(f"{base}/metrics", timeout=60).text
    out: dict[str, float] = {}
    for m in re.finditer(r'^radixserve_e2e_request_latency_seconds_count\{[^}]*replica="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        out[f"replica {m.group(1)}"] = out.get(f"replica {m.group(1)}", 0.0) + float(m.group(2))
    for decision, value in re.findall(r'^radixserve_router_decisions_total\{decision="(\w+)"\} (\S+)$', text, re.M):
        out[f"decisions {decision}"] = float(value)
    out["storage tokens"] = sum(float(v) for v in re.findall(
        r'^radixserve_tier_hit_tokens_total\{[^}]*tier="storage"[^}]*\} (\S+)$', text, re.M))
    return out


class RoutedServer:
    """`radixserve serve --replicas ...` in its own process, as a user starts it."""

    def __init__(self, options: dict[str, object]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "radixserve", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        for name, value in options.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        # A shared box: Ray's memory monitor kills workers at 95% of *node* memory, which other
        # processes can cause; a killed replica restarts with a cold cache. Only past 99% here.
        env = {**os.environ, "RAY_memory_usage_threshold": "0.99"}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def __enter__(self) -> RoutedServer:
        try:
            wait_until_healthy(self.base, self.proc, self.log_text, timeout=600)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()  # uvicorn stops, then serve.shutdown() and ray.shutdown()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=384)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prompts-per-pool", type=int, nargs="+", default=None,
                   help="system prompts one replica's KV pool holds (default: its share, then one more); "
                        "the first size runs every router, the others pow2 and cache-aware")
    p.add_argument("--routers", nargs="+", default=["single", "pow2", "prefix-affinity", "cache-aware"])
    p.add_argument("--serve-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="a `radixserve serve` option for every replica, e.g. kv_store_write=through")
    p.add_argument("--with-store-runs", action="store_true",
                   help="repeat pow2 and cache-aware with a shared Redis tier (started here unless --serve-opt kv_store=...)")
    p.add_argument("--replicas", type=int, default=2, help="engine replicas behind each router (single: one with all their pools)")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of each local Ray, split between its replicas")
    p.add_argument("--arrival", choices=("round-robin", "shuffled"), default="round-robin",
                   help="request order: the prompts in turn, or shuffled (seed 0). Round robin lets a load "
                        "balancer that alternates replicas partition the prompts by accident (pow2 did, after "
                        "the ingress's faster handle path: docs/benchmarks.md routing-cpu)")
    p.add_argument("--seed", type=int, default=0, help="the shuffled order's seed (and the open loop's arrivals)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="open loop: Poisson arrivals at this many requests/s (as independent users send "
                        "them) instead of --concurrency closed-loop clients; --concurrency still sizes the "
                        "pool's room for requests in flight")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()

    share = args.system_prompts // args.replicas
    pool_sizes = args.prompts_per_pool or [share, share + 1]
    # a prompt: the system prompt, the question and the chat template (3 blocks), never shared past the system prompt
    prompt_blocks = args.system_tokens // BLOCK_SIZE + 3
    blocks_for = {fit: prompt_blocks * fit + 4 * args.concurrency for fit in pool_sizes}
    extra = dict(item.split("=", 1) for item in args.serve_opt)
    store_url = extra.pop("kv_store", None)
    redis = None
    if args.with_store_runs and store_url is None:
        executable = find_redis_server()
        if executable is None:
            sys.exit("--with-store-runs: no redis-server (scripts/setup-venv.sh installs it), and no --serve-opt kv_store=")
        redis = RedisServer(executable)
        redis.start("--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru")
        store_url = redis.url
    if args.with_store_runs:  # written as computed: the other replica can load a prefix at once
        extra.setdefault("kv_store_write", "through")

    workload = SystemPromptWorkload(num_requests=args.requests, num_system_prompts=args.system_prompts,
                                    system_tokens=args.system_tokens, output_tokens=args.output_tokens)
    requests = workload.build()
    if args.arrival == "shuffled":  # each request keeps its index; only the order of sending changes
        random.Random(args.seed).shuffle(requests)
    runs = [(name, pool_sizes[0], False) for name in args.routers]
    if args.with_store_runs:
        runs += [(name, pool_sizes[0], True) for name in ("pow2", "cache-aware")]
    runs += [(name, fit, False) for fit in pool_sizes[1:] for name in ("pow2", "cache-aware")]
    rows = []
    try:
        for name, fit, store in runs:
            blocks = blocks_for[fit]
            options: dict[str, object] = {"model": "embedded", "min_cacheable_tokens": BLOCK_SIZE,
                                          "ray_num_cpus": args.ray_cpus, **extra}
            if name == "single":
                options.update(replicas=1, router="cache-aware", num_blocks=args.replicas * blocks, replica_cpus=args.ray_cpus)
            else:
                options.update(replicas=args.replicas, router=name, num_blocks=blocks,
                               replica_cpus=args.ray_cpus / args.replicas)
            if store:
                options["kv_store"] = store_url
                if redis is not None:
                    redis.client().flushall()  # each store run starts from an empty tier
            else:
                options.pop("kv_store_write", None)
            label = name + (" + Redis tier" if store else "")
            print(f"== {label}, pools of {fit} prompts ({blocks} blocks): starting", flush=True)
            with RoutedServer(options) as server:
                before = replica_counters(server.base)
                pace = {"request_rate": args.request_rate} if args.request_rate else {"concurrency": args.concurrency}
                config = LoadConfig(base_url=server.base, model="embedded", seed=args.seed, progress=False, **pace)
                run = run_load_sync(requests, config, label=label)
                after = replica_counters(server.base)
            s = summarize(run)
            delta = {k: after[k] - before.get(k, 0.0) for k in after}
            per_replica = sorted(int(v) for k, v in delta.items() if k.startswith("replica "))
            from_store = delta["storage tokens"] / s.prompt_tokens if s.prompt_tokens else 0.0
            rows.append([label, f"{fit} ({blocks})", f"{100 * (s.hit_rate or 0):.1f}%",
                         f"{100 * from_store:.1f}%" if store else "", f"{s.ttft_p50 * 1000:.0f}",
                         f"{s.ttft_p99 * 1000:.0f}", f"{s.request_throughput:.2f}", " / ".join(map(str, per_replica)),
                         f"{int(delta.get('decisions prefix', 0))} / {int(delta.get('decisions balance', 0))}"
                         if name == "cache-aware" else "", s.num_failed])
            print(rows[-1], flush=True)
            for failed in [r for r in run.results if not r.ok][:3]:
                print(f"  failed #{failed.index}: {failed.error}", flush=True)
    finally:
        if redis is not None:
            redis.close()

    store_note = ""
    if args.with_store_runs:
        store_note = (f" `+ Redis tier`: the same with `--kv-store` on one shared redis-server (emptied before each "
                      f"run), `--kv-store-write {extra.get('kv_store_write')}`; blocks a replica loads from it count "
                      "as cached (\"from store\": their share of all prompt tokens).")
    arrival_text = ("round robin over the prompts" if args.arrival == "round-robin"
                    else f"in a shuffled order, seed {args.seed}")
    pace_text = (f"open loop: Poisson arrivals at {args.request_rate:g} requests/s" if args.request_rate
                 else f"{args.concurrency} concurrent clients")
    body = "\n".join([
        f"Workload: {workload.summary()}, arriving mixed ({arrival_text}), {pace_text}. Each configuration "
        f"is `radixserve serve --replicas N --router R` in its own process "
        f"(its own local Ray with {args.ray_cpus} CPUs, the replicas splitting them; its own HTTP ingress), "
        f"the same requests in one run. A replica's KV pool holds exactly {pool_sizes[0]} of the "
        f"{args.system_prompts} system prompts (its share) plus {4 * args.concurrency} blocks for requests in flight; "
        f"`single` is one replica with all {args.replicas} pools and all {args.ray_cpus} CPUs taking all traffic "
        "(equal memory and compute: the ceiling)."
        + (f" The rows at {', '.join(map(str, pool_sizes[1:]))} prompts per pool repeat pow2 and ours with roomier "
           "pools (the ratio depends on the pool size: section routing-sim)." if pool_sizes[1:] else "")
        + store_note,
        "",
        markdown_table(["router", "prompts per pool (blocks)", "hit rate", "from store", "TTFT p50 ms", "TTFT p99 ms",
                        "req/s", "requests per replica", "decisions prefix / balance", "failed"], rows),
    ])
    print(body)
    if not args.no_docs:
        name = "routing-cpu" if args.replicas == 2 else f"routing-cpu-{args.replicas}"
        update_section(name, f"Scale-out: routers side by side (CPU, {args.replicas} replicas)", body,
                       command="python bench/bench_routing.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

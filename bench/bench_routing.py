"""Routers side by side on a local Ray Serve: the same requests against each, one run.

    .venv/bin/python bench/bench_routing.py [--requests 160] [--system-prompts 8] [--serve-opt kv_store=redis://...]

Configurations (each a fresh `radixserve serve --replicas` application, same engine options):
  one replica (all traffic; it gets both replicas' KV pool, so the comparison is equal memory),
  2 replicas with Ray's default power-of-two router, Ray Serve LLM's PrefixCacheAffinityRouter,
  and ours (KV-event prefix index). `--serve-opt NAME=VALUE` passes any `radixserve serve`
  option to every replica (e.g. kv_store=redis://127.0.0.1:6379 for "ours + Redis tier" once
  the tier is wired in; `--with-store-runs` then repeats pow2 and ours with it).
Workload: `system-prompt` with N system prompts x M questions, arriving mixed (round robin),
closed loop with --concurrency clients; each replica's KV pool is sized so that it holds about
half of the system prompts (what makes routing matter: a replica that sees every prompt thrashes).
Also measures what routing adds per request: p50 latency of a 1-token request through the routed
endpoint (one replica) vs the same engine behind the plain single-process server.
Writes the section `routing-cpu` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.loadgen import LoadConfig, run_load_sync  # noqa: E402
from radixserve.benchmark.results import summarize  # noqa: E402
from radixserve.benchmark.workloads import SystemPromptWorkload  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_requests(base: str) -> dict[str, float]:
    """Finished requests per replica, from the routed /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=60).text
    counts = {}
    for m in re.finditer(r'^radixserve_e2e_request_latency_seconds_count\{[^}]*replica="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
    decisions = dict(re.findall(r'^radixserve_router_decisions_total\{decision="(\w+)"\} (\S+)$', text, re.M))
    return {**counts, **{f"decisions_{k}": float(v) for k, v in decisions.items()}}


def deploy(options: dict, port: int) -> str:
    import ray
    from ray import serve

    from radixserve.cluster.launch import app_from_options

    serve.run(app_from_options(options), name="radixserve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    httpx.get(f"{base}/v1/models", timeout=120).raise_for_status()
    # the previous application's replicas leave the shared index once they stop publishing
    state = ray.get_actor("radixserve-cluster-state")
    deadline = time.monotonic() + 60
    while len(ray.get(state.live_replicas.remote())) != options["replicas"] and time.monotonic() < deadline:
        time.sleep(1)
    return base


def sequential_latency(base: str, n: int) -> list[float]:
    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(n + 2):
            started = time.perf_counter()
            r = client.post(f"{base}/v1/completions", json={"model": "embedded", "prompt": f"Hi {i}", "max_tokens": 1})
            r.raise_for_status()
            if i >= 2:  # the first two warm up
                times.append(time.perf_counter() - started)
    return times


def direct_latency(engine_options: dict, n: int) -> list[float]:
    """The same 1-token requests against the plain single-process server (no Ray on the path)."""
    from radixserve.cli import build_parser
    from radixserve.commands.common import engine_config_from_args
    from radixserve.server import ServerConfig, create_app
    from tests.live_server import serve_app

    argv = ["serve"] + [a for k, v in engine_options.items() if k != "min_cacheable_tokens"
                        for a in ("--" + k.replace("_", "-"), str(v))]
    config = engine_config_from_args(build_parser().parse_args(argv))
    config.model.show_progress = False
    with serve_app(create_app(config, ServerConfig())) as base:
        return sequential_latency(base, n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=384)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--blocks-per-replica", type=int, default=0,
                   help="KV pool of a replica (default: room for about half the system prompts)")
    p.add_argument("--routers", nargs="+", default=["single", "pow2", "prefix-affinity", "cache-aware"])
    p.add_argument("--serve-opt", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--with-store-runs", action="store_true", help="repeat pow2 and cache-aware with --serve-opt's store")
    p.add_argument("--latency-requests", type=int, default=40)
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (GPUs are detected)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()

    import ray
    from ray import serve

    block_size = 16
    prompt_blocks = args.system_tokens // block_size + 3
    blocks = args.blocks_per_replica or prompt_blocks * (args.system_prompts // 2 + 1) + 4 * args.concurrency
    extra = dict(item.split("=", 1) for item in args.serve_opt)
    workload = SystemPromptWorkload(num_requests=args.requests, num_system_prompts=args.system_prompts,
                                    system_tokens=args.system_tokens, output_tokens=args.output_tokens)
    requests = workload.build()
    port = free_port()
    # The box is shared: Ray's memory monitor kills workers at 95% of *node* memory, which other
    # processes can cause; a killed ingress fails every request of a run. Only past 99% here.
    os.environ.setdefault("RAY_memory_usage_threshold", "0.99")
    ray.init(num_cpus=args.ray_cpus, namespace="radixserve-bench", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs = [(name, {}) for name in args.routers]
    if args.with_store_runs:
        runs += [(name, {"store": True}) for name in ("pow2", "cache-aware")]
    rows, results = [], {}
    for name, flags in runs:
        options = {"model": "embedded", "replica_cpus": 0.5, "min_cacheable_tokens": 16, **extra}
        if name == "single":
            options.update(replicas=1, router="cache-aware", num_blocks=2 * blocks)
        else:
            options.update(replicas=2, router=name, num_blocks=blocks)
        if not flags.get("store"):
            options.pop("kv_store", None)
        label = name + (" + store" if flags.get("store") else "")
        print(f"== {label}: deploying", flush=True)
        base = deploy(options, port)
        before = replica_requests(base)
        config = LoadConfig(base_url=base, model="embedded", concurrency=args.concurrency, progress=False)
        run = run_load_sync(requests, config, label=label)
        s = summarize(run)
        after = replica_requests(base)
        per_replica = sorted(int(after[k] - before.get(k, 0)) for k in after if not k.startswith("decisions_"))
        decisions = {k.removeprefix("decisions_"): int(after[k] - before.get(k, 0)) for k in after
                     if k.startswith("decisions_")}
        results[label] = s
        rows.append([label, f"{100 * (s.hit_rate or 0):.1f}%", f"{s.ttft_p50 * 1000:.0f}", f"{s.ttft_p99 * 1000:.0f}",
                     f"{s.request_throughput:.2f}", " / ".join(map(str, per_replica)),
                     f"{decisions.get('prefix', 0)} / {decisions.get('balance', 0)}" if name == "cache-aware" else "",
                     s.num_failed])
        print(rows[-1], flush=True)
        for failed in [r for r in run.results if not r.ok][:3]:
            print(f"  failed #{failed.index}: {failed.error}", flush=True)
    # routing overhead: one replica through the routed endpoint vs the plain server, same engine
    # the replica gets every core, like the plain server (Ray sets a worker's torch threads to its CPUs)
    options = {"model": "embedded", **extra, "replica_cpus": args.ray_cpus, "replicas": 1, "router": "cache-aware",
               "num_blocks": blocks}
    base = deploy(options, port)
    routed = sequential_latency(base, args.latency_requests)
    text = httpx.get(f"{base}/metrics", timeout=60).text
    routing_s = float(re.search(r"^radixserve_router_seconds_total (\S+)$", text, re.M).group(1))
    decided = sum(float(v) for v in re.findall(r'^radixserve_router_decisions_total\{[^}]*\} (\S+)$', text, re.M))
    serve.shutdown()
    ray.shutdown()
    cluster_only = {"replicas", "router", "router_balance", "replica_cpus", "replica_gpus", "ray_address", "ray_num_cpus"}
    engine_options = {k: v for k, v in {**options, **extra}.items() if k not in cluster_only}
    direct = direct_latency(engine_options, args.latency_requests)
    p50_routed, p50_direct = statistics.median(routed), statistics.median(direct)
    body = "\n".join([
        f"Workload: {workload.summary()}, arriving mixed (round robin over the prompts), {args.concurrency} "
        f"concurrent clients. Two replicas of the embedded model, {blocks} KV blocks each (about half the system "
        f"prompts fit); `single` is one replica with {2 * blocks} blocks taking all traffic (equal total memory). "
        "All on one local Ray (2 CPUs for everything, replicas 0.5 CPU each), same requests in one run.",
        "",
        markdown_table(["router", "hit rate", "TTFT p50 ms", "TTFT p99 ms", "req/s", "requests per replica",
                        "decisions prefix / balance", "failed"], rows),
        "",
        f"Routing overhead, {args.latency_requests} sequential 1-token completions: p50 {p50_routed * 1000:.1f} ms "
        f"through the routed endpoint (HTTP proxy, ingress, router, handle to the replica) vs "
        f"{p50_direct * 1000:.1f} ms against the plain server: +{(p50_routed - p50_direct) * 1000:.1f} ms. "
        f"Of that, choosing the replica (the router's own code) took {1e6 * routing_s / max(decided, 1):.0f} us "
        f"per request on average.",
    ])
    print(body)
    if not args.no_docs:
        update_section("routing-cpu", "Scale-out: routers side by side (CPU, 2 replicas)", body,
                       command="python bench/bench_routing.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

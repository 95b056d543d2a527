"""Where the routed endpoint's extra latency goes: the same sequential requests hop by hop.

    .venv/bin/python bench/bench_routing_overhead.py [--requests 60] [--ray-cpus 2] [--repeat 3]

One local Ray; each configuration is deployed alone (the others are torn down) and gets the same
sequential requests from one HTTP client (p50 over --requests, after 3 warm-ups):
  serve-echo         a Serve deployment that answers at once (Ray's floor: proxy + one replica call)
  ingress-echo       our Ingress forwarding to a deployment that answers at once (adds our hop:
                     the ingress's handle call and the response), router = ours (-pow2: Ray's)
  routed no-engine   the Serve application (Serve's proxy, the Ingress deployment, one replica of
                     the embedded model; a Serve config deploys this), requests its app
                     refuses at once (unknown model: HTTP, Ray, routing hint, parsing; no engine step)
  routed 1-token     the same, 1-token completions
  handle no-engine   the no-engine requests sent from this process straight to the Engine
                     deployment's handle as the ingress makes it (routing_handle: our router on
                     the caller's loop, gRPC; no Serve proxy, no ingress)
  transports         one handle call to a deployment that answers at once, each way Ray Serve
                     offers (actor call or gRPC, router on its own loop or the caller's), with
                     the CPU each end spends per call
  serve --replicas 1 the same two request kinds against `radixserve serve --replicas 1` in its
                     own process: Ray, the engine deployment, and that process's own HTTP
                     ingress (http_ingress_app: no Serve proxy, no ingress actor)
  direct ...         the same two request kinds against the plain single-process server (no Ray)
The two request kinds alternate in --rounds rounds; `serve --replicas 1` and direct alternate
--repeat times (each a fresh process), and each round's difference is reported; --baseline-tree
adds another checkout's `serve --replicas 1` to every round (before / after, side by side). The 1-token rows include the model's forward
pass, whose time on a shared 2-core box varies more than the hops measured; the no-engine rows
show the path alone.
Writes the section `routing-overhead` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.report import markdown_table, update_section  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_posts(url: str, n: int, body: dict, expect: int = 200) -> list[float]:
    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(n + 3):
            payload = {**body, "prompt": f"Hi {i}"}
            started = time.perf_counter()
            r = client.post(url, json=payload)
            assert r.status_code == expect, r.text
            if i >= 3:  # warm-ups: connections, first-call imports, the router's first sync
                times.append(time.perf_counter() - started)
    return times


def model_requests(base: str, n: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds of requests the replica's app refuses at once (an unknown model: the
    whole HTTP and Ray path, the routing hint, the app's parsing, no engine step) and 1-token
    completions (plus the engine)."""
    out: dict[str, list[float]] = {"no-engine": [], "1-token": []}
    for _ in range(rounds):
        out["no-engine"] += timed_posts(f"{base}/v1/completions", n // rounds, {"model": "unknown", "max_tokens": 1}, 404)
        out["1-token"] += timed_posts(f"{base}/v1/completions", n // rounds, {"model": "embedded", "max_tokens": 1})
    return out


class EchoReplica:
    """Answers a forwarded request at once, as the engine replica's handle would (start, one chunk)."""

    async def handle(self, request):
        yield {"status": 200, "headers": [(b"content-type", b"application/json")], "body": b'{"ok": true}',
               "more_body": False}


def echo_ingress():
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Echo:
        @app.post("/{path:path}")
        async def answer(self, path: str) -> dict:
            return {"ok": True}

    return Echo.bind()


def ingress_echo(router: str):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from radixserve.cluster.deployments import ROUTERS, Ingress
    from radixserve.server.config import ServerConfig

    config = RequestRouterConfig(request_router_class=ROUTERS[router])
    engine = serve.deployment(EchoReplica, name="Engine", ray_actor_options={"num_cpus": 0},
                              request_router_config=config).bind()
    return serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0}).bind(engine, ServerConfig())


def handle_requests(n: int) -> list[float]:
    """No-engine requests straight to the Engine deployment's handle from this process (our
    router, no Serve proxy, no ingress): what one actor hop costs."""
    import asyncio
    import json

    from ray import serve

    from radixserve.cluster.deployments import routing_handle
    from radixserve.cluster.routing_hint import RoutedRequest

    async def run() -> list[float]:
        handle = routing_handle(serve.get_deployment_handle("Engine", app_name="routed"))
        times = []
        for i in range(n + 3):
            body = json.dumps({"model": "unknown", "prompt": f"Hi {i}", "max_tokens": 1}).encode()
            request = RoutedRequest("POST", "/v1/completions", b"", [(b"content-type", b"application/json")], body)
            started = time.perf_counter()
            first = await handle.handle.remote(request).__anext__()
            assert first["status"] == 404, first
            if i >= 3:
                times.append(time.perf_counter() - started)
        await handle.shutdown_async()
        return times

    return asyncio.run(run())


def handle_transports(n: int, rounds: int = 5) -> dict[str, list[float]]:
    """One handle call to a deployment that answers at once (EchoReplica, our router), made from
    this process the ways Ray Serve offers, interleaved in `rounds` rounds: what each way of
    making the ingress's one hop costs. The CPU seconds of this process and of the replica per
    round are added as "<name> cpu caller" / "<name> cpu replica", the calls as "<name> calls"
    (the 2-core box is CPU-bound)."""
    import asyncio

    from ray import serve
    from ray.serve.handle import DeploymentHandle

    from radixserve.cluster.deployments import HANDLE_OPTIONS, REPLICA_ENV_VARS, ROUTERS
    from radixserve.cluster.routing_hint import RoutedRequest
    from ray.serve.config import RequestRouterConfig

    config = RequestRouterConfig(request_router_class=ROUTERS["cache-aware"],
                                 request_router_kwargs={"first_sync_timeout_s": 0.01})
    serve.run(serve.deployment(EchoReplica, name="Engine", request_router_config=config,
                               ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV_VARS}}).bind(),
              name="transports", route_prefix=None)
    replica_pid = _replica_pid("transports")
    request = RoutedRequest("POST", "/v1/completions", b"", [(b"content-type", b"application/json")], b'{"model": "x"}')
    grpc = {k: v for k, v in HANDLE_OPTIONS.items() if k != "stream"}
    ways = {  # name: (router on the caller's loop?, options)
        "handle: actor call, router in its own loop (Serve's default)": (False, {}),
        "handle: actor call, router on the caller's loop": (True, {}),
        "handle: gRPC, pickle, router in its own loop": (False, grpc),
        "handle: gRPC, cloudpickle, router on the caller's loop": (True, {"_by_reference": False}),
        "handle: gRPC, pickle, router on the caller's loop (ours)": (True, grpc),
    }

    async def run() -> dict[str, list[float]]:
        handles = {}
        for name, (same_loop, options) in ways.items():
            handle = DeploymentHandle("Engine", "transports")
            handle._init(_run_router_in_separate_loop=not same_loop)
            handles[name] = handle.options(stream=True, **options)
        out: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, handle in handles.items():
                cpu = (_cpu_seconds(os.getpid()), _cpu_seconds(replica_pid))
                for i in range(n // rounds + 3):
                    started = time.perf_counter()
                    first = await handle.handle.remote(request).__anext__()
                    assert first["status"] == 200, first
                    if i >= 3:
                        out.setdefault(name, []).append(time.perf_counter() - started)
                # CPU time comes in clock ticks (10 ms): summed over the rounds, divided once
                out.setdefault(f"{name} cpu caller", []).append(_cpu_seconds(os.getpid()) - cpu[0])
                out.setdefault(f"{name} cpu replica", []).append(_cpu_seconds(replica_pid) - cpu[1])
                out.setdefault(f"{name} calls", []).append(n // rounds + 3)
        for handle in handles.values():
            await handle.shutdown_async()
        return out

    try:
        return asyncio.run(run())
    finally:
        serve.delete("transports")


def _replica_pid(app: str) -> int:
    import ray

    actor = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{app}#")]
    return ray.get(ray.get_actor(actor[0]["name"], namespace=actor[0]["namespace"]).__ray_call__.remote(
        lambda self: os.getpid()))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread (Ray's core worker threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def routed_model(options: dict):
    from radixserve.cluster.launch import app_from_options

    return app_from_options(options)


def served_model(n: int, rounds: int, extra_args: list[str], env: dict[str, str] | None = None,
                 tree: str | None = None) -> dict[str, list[float]]:
    """`radixserve serve` in its own process, as users run it (in-process it would share the
    client's GIL); extra_args e.g. --replicas 1 (then its own Ray, and its HTTP ingress in it);
    env: extra environment variables of that process (and of the Ray it starts); tree: run the
    radixserve of that checkout instead of this one (a baseline)."""
    import subprocess
    import tempfile

    from tests.live_server import wait_until_healthy

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "radixserve", "serve", "--model", "embedded", "--host",
                                 "127.0.0.1", "--port", str(port), *extra_args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {}), **({"PYTHONPATH": tree} if tree else {})},
                                cwd=tree)  # python -m puts the working directory first on sys.path
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_healthy(base, proc, lambda: (log.seek(0), log.read())[1])
            return model_requests(base, n, rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def hint_costs(repeat: int = 30) -> list[list[str]]:
    """The ingress's routing hint for a chat request (render, tokenize, key), in-process: with the
    plain tokenizer, and with the ingress's PieceMemoTokenizer once it has seen the system prompt."""
    import dataclasses
    import json

    from radixserve.cache.block_keys import CacheIdentity
    from radixserve.cluster.routing_hint import PieceMemoTokenizer, RoutingProfile, prompt_hint
    from radixserve.model.loader import find_embedded_gguf
    from radixserve.model.tokenizer import Tokenizer
    from radixserve.request import CachePolicy
    from radixserve.server.auth import Authenticator
    from radixserve.server.config import ServerConfig

    config = ServerConfig()
    auth = Authenticator(config.api_keys, config.namespace_from_api_key, admin_keys=config.admin_keys,
                         metrics_keys=config.metrics_keys, default_cache_policy=CachePolicy(config.default_cache_policy))
    plain = RoutingProfile(Tokenizer.from_gguf(find_embedded_gguf()), CacheIdentity("bench", 16), config)
    memo = dataclasses.replace(plain, tokenizer=PieceMemoTokenizer(plain.tokenizer))
    rows = []
    for sentences in (40, 400):
        system = " ".join(f"Rule {i}: answer the user's question about topic {i} precisely." for i in range(sentences))
        times = {}
        for label, profile in (("plain", plain), ("memo", memo)):
            samples = []
            for i in range(repeat + 1):
                body = json.dumps({"model": "m", "messages": [{"role": "system", "content": system},
                                                              {"role": "user", "content": f"Question {i}?"}]}).encode()
                started = time.perf_counter()
                _, keys = prompt_hint(profile, auth, "/v1/chat/completions", {}, body)
                if i:  # the first one fills the memo
                    samples.append(time.perf_counter() - started)
            times[label] = statistics.median(samples)
        rows.append([f"{len(keys) * 16}-token prompt", f"{1000 * times['plain']:.2f}", f"{1000 * times['memo']:.2f}"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the two request kinds")
    p.add_argument("--only", nargs="+", default=["hint", "serve-echo", "ingress-echo", "routed", "transports",
                                                 "serve-replicas", "direct"])
    p.add_argument("--repeat", type=int, default=1, help="alternating rounds of serve --replicas 1 and direct")
    p.add_argument("--serve-arg", action="append", default=[], help="passed to both servers (e.g. --device=cuda)")
    p.add_argument("--baseline-tree", help="another checkout (e.g. `git archive main | tar -x -C DIR`): its "
                   "`serve --replicas 1` joins each alternating round, before this tree's")
    p.add_argument("--baseline-label", default="baseline")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()

    import ray
    from ray import serve

    os.environ.setdefault("RAY_memory_usage_threshold", "0.99")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    body = {"model": "embedded", "max_tokens": 1}
    results: dict[str, list[float]] = {}
    model_options = {"model": "embedded", "replicas": 1, "replica_cpus": args.ray_cpus,
                     **dict(a.removeprefix("--").split("=", 1) for a in args.serve_arg)}
    ray_runs = {"serve-echo": echo_ingress, "ingress-echo": lambda: ingress_echo("cache-aware"),
                "ingress-echo-pow2": lambda: ingress_echo("pow2"), "routed": lambda: routed_model(model_options)}
    # this process's own Ray only when a row needs it: once (a run with the transports rows) its
    # core worker aborted the process a minute after ray.shutdown(), mid-way through the rounds
    in_process = [name for name in [*ray_runs, "transports"] if name in args.only]
    if in_process:
        ray.init(num_cpus=args.ray_cpus, namespace="radixserve-bench", include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, build in ray_runs.items():
        if name not in args.only:
            continue
        print(f"== {name}", flush=True)
        serve.run(build(), name=name, route_prefix="/")
        if name == "routed":
            for kind, times in model_requests(base, args.requests, args.rounds).items():
                results[f"routed {kind}"] = times
            results["handle no-engine"] = handle_requests(args.requests)
        else:
            results[name] = timed_posts(f"{base}/v1/completions", args.requests, body)
        serve.delete(name)
    transport_rows = []
    if "transports" in args.only:
        print("== transports", flush=True)
        measured = handle_transports(args.requests * 2)
        transport_rows = [[name, f"{1000 * statistics.median(t):.2f}", f"{1000 * statistics.quantiles(t, n=10)[-1]:.2f}",
                           f"{1000 * sum(measured[name + ' cpu caller']) / sum(measured[name + ' calls']):.2f}",
                           f"{1000 * sum(measured[name + ' cpu replica']) / sum(measured[name + ' calls']):.2f}"]
                          for name, t in measured.items() if " cpu " not in name and not name.endswith(" calls")]
    if in_process:
        serve.shutdown()
        ray.shutdown()
    # `serve --replicas 1` and the plain server alternate, --repeat times: on a shared box a
    # slow minute then hits both alike, and the spread of the rounds shows the noise
    added_per_round: list[float] = []
    baseline_added_per_round: list[float] = []
    for round_index in range(args.repeat):
        medians = {}
        replicas = ["--replicas", "1", "--replica-cpus", str(args.ray_cpus), "--ray-num-cpus", str(args.ray_cpus)]
        servers = [("serve --replicas 1", replicas, None), ("direct", [], None)]
        if args.baseline_tree:
            servers.insert(0, (f"{args.baseline_label}: serve --replicas 1", replicas, args.baseline_tree))
        for name, extra, tree in servers:
            if ("serve-replicas" if extra else "direct") not in args.only:
                continue
            print(f"== {name}, round {round_index + 1}", flush=True)
            for kind, times in served_model(args.requests, args.rounds, extra + args.serve_arg, tree=tree).items():
                results.setdefault(f"{name} {kind}", []).extend(times)
                medians[f"{name} {kind}"] = statistics.median(times)
        if "serve --replicas 1 no-engine" in medians and "direct no-engine" in medians:
            added_per_round.append(medians["serve --replicas 1 no-engine"] - medians["direct no-engine"])
        baseline_key = f"{args.baseline_label}: serve --replicas 1 no-engine"
        if baseline_key in medians and "direct no-engine" in medians:
            baseline_added_per_round.append(medians[baseline_key] - medians["direct no-engine"])

    hint_rows = hint_costs() if "hint" in args.only else []
    rows = [[name, f"{1000 * statistics.median(t):.1f}", f"{1000 * statistics.quantiles(t, n=10)[-1]:.1f}"]
            for name, t in results.items()]
    body_md = markdown_table(["configuration", "p50 ms", "p90 ms"], rows)
    for kind in ("no-engine", "1-token"):
        for path in ("routed", f"{args.baseline_label}: serve --replicas 1", "serve --replicas 1"):
            if f"{path} {kind}" in results and f"direct {kind}" in results:
                added = statistics.median(results[f"{path} {kind}"]) - statistics.median(results[f"direct {kind}"])
                body_md += f"\n\nRouting adds {1000 * added:+.1f} ms p50 per {kind} request ({path} - direct)."
    if len(added_per_round) > 1:
        body_md += (f"\n\nPer round ({len(added_per_round)} alternating rounds of `serve --replicas 1` and direct, "
                    "p50 of each): routing adds " + ", ".join(f"{1000 * a:+.1f}" for a in added_per_round)
                    + f" ms per no-engine request; median of the rounds {1000 * statistics.median(added_per_round):+.1f} ms.")
    if len(baseline_added_per_round) > 1:
        body_md += (f"\n\n{args.baseline_label} in the same rounds: routing adds "
                    + ", ".join(f"{1000 * a:+.1f}" for a in baseline_added_per_round)
                    + f" ms per no-engine request; median of the rounds {1000 * statistics.median(baseline_added_per_round):+.1f} ms.")
    if transport_rows:
        body_md += ("\n\nThe ingress's one hop alone: a handle call from this process to a deployment that answers at "
                    "once, each way Ray Serve offers, interleaved rounds (CPU: ms per call, every thread of the "
                    "process):\n\n" + markdown_table(["handle call", "p50 ms", "p90 ms", "CPU caller", "CPU replica"],
                                                     transport_rows))
    if hint_rows:
        body_md += ("\n\nThe ingress's routing hint for a chat request (render, tokenize, key: on the request's "
                    "path), median ms, new question after the same system prompt:\n\n"
                    + markdown_table(["prompt", "plain tokenizer", "piece memo (system prompt seen)"], hint_rows))
    print(body_md)
    if not args.no_docs:
        update_section("routing-overhead", "Scale-out: what the routed endpoint adds per request, hop by hop",
                       body_md, command="python bench/bench_routing_overhead.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

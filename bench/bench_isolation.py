"""What tenant isolation and the cache opt-out cost, and what the isolation audit sees, on CPU.

    .venv/bin/python bench/bench_isolation.py [--rounds 5] [--prompt-tokens 1000]

Real servers (uvicorn on loopback) over the embedded model, real streaming clients; writes the
section `security-cpu` of docs/benchmarks.md:
1. shared vs per-key cache: two tenants send the same long system prompt; with per-key
   namespaces the second tenant's first request is cold, and the prefix is held twice;
2. cache_policy: the same prompt repeated under read_write (hits), read_only (hits what a
   read_write request stored) and none (cold every time);
3. authentication: the cost of checking a key against N configured keys (constant-time, all
   keys compared);
4. the isolation audit (`radixserve audit-isolation`, CI's settings) against both modes.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.text import TextGenerator  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.security.audit import AuditConfig, _Tenant, run_audit  # noqa: E402
from radixserve.server import ServerConfig, create_app  # noqa: E402

KEY_A, KEY_B = "sk-a", "sk-b"


@contextmanager
def serve(loaded, config: ServerConfig, num_blocks: int = 4096):
    import uvicorn

    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(num_blocks=num_blocks)), loaded=loaded)
    app = create_app(engine, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def tenant(url: str, key: str, **extra) -> _Tenant:
    return _Tenant(AuditConfig(base_url=url, extra_body=extra), key)


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms"


def isolation_cost(loaded, args, text: TextGenerator) -> list[list[object]]:
    rows = []
    for mode, isolate in (("shared (default)", False), ("per-key (--cache-isolation per-key)", True)):
        config = ServerConfig(api_keys=[KEY_A, KEY_B], namespace_from_api_key=isolate)
        with serve(loaded, config) as (url, engine):
            a, b = tenant(url, KEY_A), tenant(url, KEY_B)
            a.send("embedded", "warm up " + text.text(64))
            firsts_a, firsts_b, blocks = [], [], []
            for _ in range(args.rounds):
                system = text.text(args.prompt_tokens)
                before = engine.snapshot().cached_blocks
                firsts_a.append(a.send("embedded", system + "\n\nQuestion: " + text.text(12)).ttft)
                firsts_b.append(b.send("embedded", system + "\n\nQuestion: " + text.text(12)).ttft)
                blocks.append(engine.snapshot().cached_blocks - before)
            a.close()
            b.close()
        rows.append([mode, ms(firsts_a), ms(firsts_b), f"{statistics.median(blocks):.0f}"])
    return rows


def policy_cost(loaded, args, text: TextGenerator) -> list[list[object]]:
    rows = []
    with serve(loaded, ServerConfig()) as (url, engine):
        for policy in ("read_write", "read_only", "none"):
            client = tenant(url, None, cache_policy=policy)
            writer = tenant(url, None)
            ttfts, cached, stored = [], [], []
            for _ in range(args.rounds):
                prompt = text.text(args.prompt_tokens) + "\n\nQuestion: "
                writer.send("embedded", prompt + text.text(12))  # someone stored this prefix before
                before = engine.snapshot().cached_blocks
                probe = client.send("embedded", prompt + text.text(12))
                # a second, different question: does the first one's suffix stay cached?
                ttfts.append(probe.ttft)
                cached.append(probe.cached_tokens)
                stored.append(engine.snapshot().cached_blocks - before)
            client.close()
            writer.close()
            rows.append([policy, ms(ttfts), f"{statistics.median(cached):.0f}", f"{statistics.median(stored):.0f}"])
        # none: the same prompt twice, nothing planted by anyone
        client = tenant(url, None, cache_policy="none")
        cold = []
        for _ in range(args.rounds):
            prompt = text.text(args.prompt_tokens)
            client.send("embedded", prompt)
            cold.append(client.send("embedded", prompt).ttft)
        client.close()
        rows.append(["none, same prompt sent twice (2nd timed)", ms(cold), "0", "0"])
    return rows


def auth_cost() -> list[list[object]]:
    from starlette.requests import Request

    from radixserve.server.auth import Authenticator

    rows = []
    for n in (1, 100, 1000):
        keys = [f"sk-{i:06d}-{'x' * 40}" for i in range(n)]
        auth = Authenticator(keys, namespace_from_api_key=True)
        scope = {"type": "http", "headers": [(b"authorization", f"Bearer {keys[-1]}".encode())]}
        reps = max(200, 20000 // n)
        start = time.perf_counter()
        for _ in range(reps):
            auth.authenticate(Request(scope))
        rows.append([n, f"{(time.perf_counter() - start) / reps * 1e6:.1f} us"])
    return rows


def audit(loaded) -> list[list[object]]:
    rows = []
    for mode, isolate in (("shared (default)", False), ("per-key", True)):
        with serve(loaded, ServerConfig(api_keys=[KEY_A, KEY_B], namespace_from_api_key=isolate)) as (url, _):
            r = run_audit(AuditConfig(base_url=url, victim_key=KEY_A, attacker_key=KEY_B, trials=12,
                                      prompt_tokens=192, warmup=2, alpha=0.001))
        rows.append([mode, ms(r.hit_ttfts), ms(r.miss_ttfts), f"{r.ks_statistic:.2f}", f"{r.pvalue:.2g}",
                     f"{r.oracle_trials}/{r.trials}", "LEAK (exit 1)" if r.leak else "no leak (exit 0)",
                     f"{r.seconds:.0f} s"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write to this markdown file instead")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(source="embedded", show_progress=False))
    text = TextGenerator(random.Random(7))
    iso = isolation_cost(loaded, args, text)
    pol = policy_cost(loaded, args, text)
    aut = auth_cost()
    aud = audit(loaded)
    body = f"""Embedded SmolLM2-135M, fp32, block size 16; one request at a time over HTTP, streamed; medians of
{args.rounds} rounds, each with a fresh random prompt of about {args.prompt_tokens} tokens.

**Per-key isolation.** Tenants A and B send the same system prompt, each with its own question.

{markdown_table(["cache mode", "A's first TTFT", "B's first TTFT", "blocks cached per shared prompt"], iso)}

**Cache policy.** A read_write request stores the prompt first; then a request under each policy
sends the same prompt with another question.

{markdown_table(["policy", "TTFT", "cached_tokens", "blocks it added to the cache"], pol)}

**Authentication.** One key check (constant-time comparison against every configured key), per request.

{markdown_table(["configured keys", "time per check"], aut)}

**Isolation audit** (`radixserve audit-isolation --trials 12 --prompt-tokens 192 --alpha 0.001`, CI's settings).

{markdown_table(["cache mode", "hit-probe TTFT", "miss-probe TTFT", "KS D", "p", "cached_tokens oracle", "verdict", "run time"], aud)}
"""
    kwargs = {"path": args.out} if args.out else {}
    update_section("security-cpu", "CPU: what tenant isolation and the cache opt-out cost", body, **kwargs)
    print(body)


if __name__ == "__main__":
    main()

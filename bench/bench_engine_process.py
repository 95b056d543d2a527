"""Serving throughput with the engine core in its own process vs on a thread of the server, and
the engine alone in-process, on one shared-prefix workload, in one run.

    # CPU (embedded model), a small workload:
    .venv/bin/python bench/bench_engine_process.py --docs
    # GPU (the issue #18 workload, Llama-3-8B-shaped dummy weights):
    python3 bench/bench_engine_process.py --device cuda --model dummy:llama3-8b --groups 16 --per-group 16 \
        --prefix-len 2048 --new-len 128 --out-len 128 --concurrency 128 --gpu-memory-utilization 0.42 --out $OUT

Workload: `groups` random prefixes of `prefix-len` token ids, `per-group` requests each adding
`new-len` fresh tokens, `out-len` generated tokens (ignore_eos), greedy, shuffled. Clients: a
closed loop of `concurrency` streaming /v1/completions clients (token-id prompts, so the server
does no tokenizing). The same requests go to each mode.

Modes: `inprocess` (an LLMEngine stepped by this script, the same closed loop of `concurrency`
requests: the ceiling), `off` (`radixserve serve --engine-process off`) and `on` (`--engine-process
on`). Both servers run at once (so they start together, and each sees the same machine); their
passes alternate (off, on, on, off, ... for `rounds`), each after a warm-up pass of other prefixes
that compiles the kernels. Results: a table, JSON under --out, and with --docs a section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_server import wait_until_healthy  # noqa: E402


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def make_prompts(vocab: int, groups: int, per_group: int, prefix_len: int, new_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab) for _ in range(prefix_len)] for _ in range(groups)]
    prompts = [prefixes[g] + [rng.randrange(vocab) for _ in range(new_len)] for g in range(groups) for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def summary(mode: str, wall: float, ttfts: list[float], num_requests: int, out_len: int, hit_rate: float | None) -> dict:
    ttfts = sorted(ttfts)
    return {"mode": mode, "requests": num_requests, "wall_s": wall, "req_per_s": num_requests / wall,
            "output_tok_per_s": num_requests * out_len / wall, "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], "hit_rate": hit_rate}


# ---- in-process ------------------------------------------------------------------------------


def engine_config(args):
    from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    return EngineConfig(
        model=ModelConfig(source=args.model, device=args.device, max_model_len=args.max_model_len, show_progress=False),
        cache=CacheConfig(num_blocks=args.num_blocks, gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )


def run_inprocess(engine, prompts: list[list[int]], args) -> dict:
    """A closed loop of `concurrency` requests on the engine itself (no HTTP, no threads)."""
    from radixserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.out_len, temperature=0, ignore_eos=True)
    queue = list(reversed(prompts))
    live: dict[str, object] = {}
    ttfts = []
    before = engine.snapshot()
    t0 = time.perf_counter()
    while queue or live:
        while queue and len(live) < args.concurrency:
            request = engine.add_request(queue.pop(), params, arrival_time=time.monotonic())
            live[request.request_id] = request
        for out in engine.step():
            if out.finished:
                request = live.pop(out.request_id)
                ttfts.append(request.first_token_time - request.arrival_time)
    wall = time.perf_counter() - t0
    after = engine.snapshot()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return summary("inprocess", wall, ttfts, len(prompts), args.out_len, hits / queries if queries else None)


# ---- over HTTP ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(args) -> list[str]:
    flags = ["--model", args.model, "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.num_blocks:
        flags += ["--num-blocks", str(args.num_blocks)]
    if args.max_model_len:
        flags += ["--max-model-len", str(args.max_model_len)]
    return flags


def start_server(mode: str, args, log_dir: Path, env: dict) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = log_dir / f"server-{mode}.log"
    cmd = [sys.executable, "-m", "radixserve", "serve", "--port", str(port), "--engine-process", mode,
           "--log-level", "warning", *engine_flags(args)]
    # this checkout first, and whatever else the caller's PYTHONPATH had (a device's /tmp/site)
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", log_path


async def _client_share(base: str, prompts: list[list[int]], concurrency: int, out_len: int,
                        start_at: float) -> tuple[list[float], int, int, float]:
    """One client process's share: a closed loop of `concurrency` streaming clients from
    `start_at` (time.time()); returns (TTFTs, prompt tokens, cached tokens, end time). TTFT is the
    first streamed chunk."""
    queue = list(reversed(prompts))
    ttfts: list[float] = []
    tokens = [0, 0]  # prompt, cached
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)

    async def client_loop(http: httpx.AsyncClient, model: str) -> None:
        while queue:
            prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if first is None:
                        first = time.perf_counter() - start
                    if '"usage": {' in line:
                        usage = json.loads(line[6:])["usage"]
                        tokens[0] += usage["prompt_tokens"]
                        tokens[1] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            ttfts.append(first if first is not None else time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(client_loop(http, model) for _ in range(concurrency)))
    return ttfts, tokens[0], tokens[1], time.time()


def _client_process(base: str, prompts: list[list[int]], concurrency: int, out_len: int, start_at: float):
    return asyncio.run(_client_share(base, prompts, concurrency, out_len, start_at))


def run_http(base: str, mode: str, prompts: list[list[int]], args) -> dict:
    """`concurrency` streaming clients over `client_processes` processes (one Python process
    parsing every stream would measure the client, not the server)."""
    n = max(1, min(args.client_processes, args.concurrency))
    shares = [(prompts[i::n], args.concurrency // n + (i < args.concurrency % n)) for i in range(n)]
    start_at = time.time() + 1.0 + 0.2 * n  # every client connected before the clock starts
    if n == 1:
        parts = [_client_process(base, prompts, args.concurrency, args.out_len, start_at)]
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_client_process, base, share, c, args.out_len, start_at) for share, c in shares]
            parts = [f.result() for f in futures]
    ttfts = [t for part in parts for t in part[0]]
    prompt_tokens, cached_tokens = sum(p[1] for p in parts), sum(p[2] for p in parts)
    wall = max(p[3] for p in parts) - start_at
    return summary(mode, wall, ttfts, len(prompts), args.out_len, cached_tokens / prompt_tokens if prompt_tokens else None)


# ---- main --------------------------------------------------------------------------------------


def table(rows: list[dict], reference: float | None) -> str:
    lines = ["| mode | pass | requests | wall | req/s | vs in-process | output tok/s | TTFT p50 | TTFT p99 | hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"inprocess": "engine in-process (no HTTP)", "off": "HTTP, engine thread (--engine-process off)",
             "on": "HTTP, engine process (--engine-process on)"}
    for r in rows:
        ratio = f"{r['req_per_s'] / reference:.0%}" if reference else "-"
        hit = f"{r['hit_rate']:.1%}" if r["hit_rate"] is not None else "-"
        lines.append(f"| {names[r['mode']]} | {r.get('pass', 1)} | {r['requests']} | {r['wall_s']:.1f} s | "
                     f"{r['req_per_s']:.2f} | {ratio} | {r['output_tok_per_s']:,.0f} | {r['ttft_p50_s'] * 1000:,.0f} ms | "
                     f"{r['ttft_p99_s'] * 1000:,.0f} ms | {hit} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--new-len", type=int, default=32)
    p.add_argument("--out-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--client-processes", type=int, default=1,
                   help="processes the streaming clients are spread over (a GPU server outpaces one Python client)")
    p.add_argument("--warmup-groups", type=int, default=None, help="groups of the warm-up pass (default: groups / 2)")
    p.add_argument("--rounds", type=int, default=2, help="off/on pass pairs (alternating order)")
    p.add_argument("--modes", default="inprocess,off,on")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_engine_process"))
    p.add_argument("--docs", action="store_true", help="write the section to docs/benchmarks.md")
    p.add_argument("--render", metavar="JSON", help="only write the docs section of a bench_engine_process.json")
    args = p.parse_args()
    if args.render:
        write_docs(json.loads(Path(args.render).read_text()))
        return
    modes = args.modes.split(",")
    server_env = dict(os.environ)  # the servers run as users start them
    if args.device == "cpu":
        # this process steps the in-process engine on its main thread while its HTTP clients
        # share the cores: passive OpenMP waits, as the engine core process uses (engine_process.py)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_engine_process.py " + " ".join(sys.argv[1:])
    log(command)
    rows: list[dict] = []

    from radixserve.config import EngineConfig  # noqa: F401  (torch import, before the timed parts)

    vocab = None
    if "inprocess" in modes:
        from radixserve.engine import LLMEngine

        t0 = time.perf_counter()
        engine = LLMEngine(engine_config(args))
        vocab = engine.tokenizer.vocab_size
        log(f"in-process engine built in {time.perf_counter() - t0:.1f} s")
        warm = make_prompts(vocab, args.warmup_groups or max(1, args.groups // 2), args.per_group, args.prefix_len,
                            args.new_len, seed=1)
        log("in-process warm-up:", run_inprocess(engine, warm, args))
        rows.append(run_inprocess(engine, make_prompts(vocab, args.groups, args.per_group, args.prefix_len,
                                                        args.new_len, seed=0), args))
        log(rows[-1])
        engine.close()
        del engine
        if args.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    servers = {}
    try:
        http_modes = [m for m in ("off", "on") if m in modes]
        t0 = time.perf_counter()
        for mode in http_modes:
            servers[mode] = start_server(mode, args, out, server_env)
        for mode in http_modes:
            proc, base, log_path = servers[mode]
            wait_until_healthy(base, proc, lambda: f"server exited:\n{log_path.read_text()[-3000:]}", timeout=900)
        log(f"servers up in {time.perf_counter() - t0:.1f} s")
        if http_modes and vocab is None:
            from radixserve.config import ModelConfig
            from radixserve.model.loader import load_model

            # the embedded model's vocabulary; any model has the first thousand ids
            vocab = load_model(ModelConfig(source=args.model, device="cpu", show_progress=False)).arch.vocab_size \
                if args.model == "embedded" else 1000
        warm = make_prompts(vocab, args.warmup_groups or max(1, args.groups // 2), args.per_group, args.prefix_len,
                            args.new_len, seed=1)
        for mode in http_modes:
            log(f"{mode} warm-up:", run_http(servers[mode][1], mode, warm, args))
        for round_no in range(args.rounds):
            order = http_modes if round_no % 2 == 0 else list(reversed(http_modes))
            for mode in order:
                httpx.post(f"{servers[mode][1]}/reset_prefix_cache", timeout=60)  # each pass starts cold
                prompts = make_prompts(vocab, args.groups, args.per_group, args.prefix_len, args.new_len, seed=0)
                row = run_http(servers[mode][1], mode, prompts, args)
                row["pass"] = round_no + 1
                rows.append(row)
                log(row)
    finally:
        for proc, _, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    reference = next((r["req_per_s"] for r in rows if r["mode"] == "inprocess"), None)
    on = [r["req_per_s"] for r in rows if r["mode"] == "on"]
    off = [r["req_per_s"] for r in rows if r["mode"] == "off"]
    ratio = (sum(on) / len(on)) / (sum(off) / len(off)) if on and off else None
    text = table(rows, reference)
    print(text)
    if ratio is not None:
        print(f"mean req/s, engine process on / off: {ratio:.2f}x")
    from bench.report import machine_description

    machine = machine_description()  # the GPU, or the CPU with its cores and load average
    result = {"command": command, "machine": machine, "date": datetime.date.today().isoformat(), "rows": rows,
              "on_over_off": ratio, "args": vars(args)}
    (out / "bench_engine_process.json").write_text(json.dumps(result, indent=1))
    (out / "bench_engine_process.md").write_text(text + "\n")
    if args.docs:
        write_docs(result)


def write_docs(result: dict) -> None:
    """The section of docs/benchmarks.md (also from a JSON measured elsewhere: --render)."""
    from bench.report import update_section

    args = argparse.Namespace(**result["args"])
    reference = next((r["req_per_s"] for r in result["rows"] if r["mode"] == "inprocess"), None)
    text = table(result["rows"], reference)

    body = (f"{args.groups} groups x {args.per_group} requests, {args.prefix_len}-token shared prefix + {args.new_len} "
            f"new tokens, {args.out_len} out, {args.concurrency} concurrent streaming clients; the two servers ran at "
            f"once and their passes alternated, each pass from an empty prefix cache; the in-process pass ran "
            f"before them (on a busy machine only the alternating on/off ratio is comparable). Mean req/s, engine "
            f"process on / off: **{_ratio(result['on_over_off'])}**.\n\n{text}")
    update_section(f"engine-process-{args.device.split(':')[0]}", f"Engine core in its own process ({args.device})", body,
                   command=result["command"], machine=result["machine"], date=result["date"])


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


if __name__ == "__main__":
    main()

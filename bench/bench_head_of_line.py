"""Head-of-line blocking over HTTP: the time to first token of a short request sent just behind
an uncached long prompt, with the scheduler's room for new prompts on (the default) and off.

    .venv/bin/python bench/bench_head_of_line.py [--long-tokens 8191] [--delay 0.5] [--repeats 2]

Each run starts a fresh server (embedded model, its own pool), sends a `--long-tokens` prompt of
random token ids (uncached) to /v1/completions, waits `--delay` seconds, then sends a 1-token
chat question, both streamed, and records each one's TTFT as its client saw it. Writes the
section "cpu-head-of-line" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402


def _serve(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def _ttft(client, path: str, body: dict) -> float:
    start = time.perf_counter()
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        lines = r.aiter_lines()
        async for line in lines:
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[5:]).get("choices") or [{}])[0]
            if choice.get("text") or choice.get("delta", {}).get("content") or choice.get("finish_reason"):
                ttft = time.perf_counter() - start  # the first token (or the end, if it decoded to nothing)
                break
        else:
            raise RuntimeError("no token came")
        async for _ in lines:
            pass
    return ttft


def run_once(loaded, fraction: float, long_tokens: int, delay: float, seed: int) -> tuple[float, float]:
    import httpx

    from radixserve.server import ServerConfig, create_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(num_blocks=1024),
                                    scheduler=SchedulerConfig(new_prompt_budget_fraction=fraction)), loaded=loaded)
    server, thread, base = _serve(create_app(engine, ServerConfig()))
    rng = random.Random(seed)
    long_prompt = [rng.randrange(1000, 40000) for _ in range(long_tokens)]

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            long = asyncio.create_task(_ttft(client, "/v1/completions", {
                "model": "embedded", "prompt": long_prompt, "max_tokens": 1, "stream": True}))
            await asyncio.sleep(delay)
            short = await _ttft(client, "/v1/chat/completions", {
                "model": "embedded", "max_tokens": 1, "stream": True,
                "messages": [{"role": "user", "content": "Hi"}]})
            return await long, short

    try:
        return asyncio.run(main())
    finally:
        server.should_exit = True
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=8191 - 1)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model(ModelConfig(source="embedded", show_progress=False))
    rows = []
    for fraction, label in ((0.0, "off (before #12)"), (0.25, "on: 1/4 of the budget (default)")):
        results = [run_once(loaded, fraction, args.long_tokens, args.delay, seed) for seed in range(args.repeats)]
        long_ttft = statistics.median(r[0] for r in results)
        short_ttft = statistics.median(r[1] for r in results)
        rows.append([label, f"{short_ttft:.1f} s", f"{long_ttft:.1f} s"])
        print(label, results, flush=True)
    body = (
        f"A 1-token chat request sent {args.delay} s after an uncached {args.long_tokens}-token completions prompt "
        f"(`--max-num-batched-tokens 2048`), both streamed; median of {args.repeats} runs, fresh server each.\n\n"
        + markdown_table(["room for new prompts", "short request TTFT", "long request TTFT"], rows)
    )
    print(body)
    update_section("cpu-head-of-line", "CPU: a short request behind a long prefill (head-of-line blocking)", body)


if __name__ == "__main__":
    main()

"""Warm restart (--state-dir): what the first requests after a restart pay, and what saving costs.

    .venv/bin/python bench/bench_warm_restart.py [--caches 4] [--prompt-tokens 2000] [--repeats 2]

One run: a server with a state directory creates `--caches` named caches of about
`--prompt-tokens` tokens each and is stopped; a new server starts on the same directory, waits
for its background warm-up, and serves one streamed chat request naming each cache. Side by side,
a server without a state directory (what a restart was before) gets the same requests with the
cache's text sent in full, since the name is gone. Both report the client-side time to first
token. Also timed: one state save (the fsync'd atomic rewrite) with all the caches and their pins.
Writes the section "cpu-warm-restart" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402

_WORDS = ("account answer archive balance billing cache cluster customer deploy document engine error export "
          "feature gateway guide invoice latency limit metric model network order policy prompt quota region").split()


def _serve(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _stop(server, thread) -> None:
    server.should_exit = True
    thread.join()


def _app(loaded, state_dir: str | None):
    from radixserve.server import ServerConfig, create_app

    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False),
                                    cache=CacheConfig(num_blocks=4096)), loaded=loaded)
    return create_app(engine, ServerConfig(min_cacheable_tokens=32, state_dir=state_dir))


def _document(loaded, num_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words = [f"Document {seed}."]
    while len(loaded.tokenizer.encode(" ".join(words))) < num_tokens:
        words += [rng.choice(_WORDS) for _ in range(50)]
    return " ".join(words)


async def _ttft(client, body: dict) -> float:
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                choice = (json.loads(line[5:]).get("choices") or [{}])[0]
                if choice.get("delta", {}).get("content") or choice.get("finish_reason"):
                    return time.perf_counter() - start
    raise RuntimeError("no token came")


def run_once(loaded, num_caches: int, prompt_tokens: int, seed: int) -> dict:
    import httpx

    docs = [_document(loaded, prompt_tokens, seed * 100 + k) for k in range(num_caches)]
    question = [{"role": "user", "content": "Summarize the document in one word."}]
    with tempfile.TemporaryDirectory() as state_dir:
        server, thread, base = _serve(_app(loaded, state_dir))
        names = []
        with httpx.Client(base_url=base, timeout=600) as http:
            for doc in docs:
                r = http.post("/v1/caches", json={"model": "embedded", "system": doc, "ttl": "3600s"})
                r.raise_for_status()
                names.append(r.json()["name"])
        _stop(server, thread)
        state_path = Path(state_dir) / "server-state.json"
        state_bytes = state_path.stat().st_size
        save = _time_save(state_path)

        started = time.perf_counter()
        app = _app(loaded, state_dir)
        server, thread, base = _serve(app)
        keeper = app.state.radixserve.keeper
        while not keeper.warm_done.is_set():
            time.sleep(0.05)
        warm_up = time.perf_counter() - started

        async def warm_requests():
            async with httpx.AsyncClient(base_url=base, timeout=600) as client:
                return [await _ttft(client, {"model": "embedded", "max_tokens": 1, "messages": question,
                                             "cached_content": name}) for name in names]

        warm = asyncio.run(warm_requests())
        _stop(server, thread)

    server, thread, base = _serve(_app(loaded, None))  # before --state-dir: the names are gone, resend the text

    async def cold_requests():
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            return [await _ttft(client, {"model": "embedded", "max_tokens": 1,
                                         "messages": [{"role": "system", "content": doc}, *question]}) for doc in docs]

    cold = asyncio.run(cold_requests())
    _stop(server, thread)
    return {"warm": warm, "cold": cold, "warm_up": warm_up, "save": save, "state_bytes": state_bytes}


def _time_save(state_path: Path, repeats: int = 5) -> float:
    """Median time of one save of the state the server wrote (temp file, fsync, rename, dir fsync)."""
    from radixserve.state_file import StateFile

    data = json.loads(state_path.read_text())["data"]
    target = StateFile(state_path.with_name("timed.json"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert target.save(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model(ModelConfig(source="embedded", show_progress=False))
    runs = [run_once(loaded, args.caches, args.prompt_tokens, seed) for seed in range(args.repeats)]
    for run in runs:
        print(run, flush=True)
    warm = statistics.median(t for run in runs for t in run["warm"])
    cold = statistics.median(t for run in runs for t in run["cold"])
    warm_up = statistics.median(run["warm_up"] for run in runs)
    rows = [
        ["restarted with `--state-dir`, after the warm-up (name still valid)", f"{warm * 1000:.0f} ms", "1.00"],
        ["restarted without it (name gone: the text is sent again, cold)", f"{cold * 1000:.0f} ms",
         f"{cold / warm:.1f}x"],
    ]
    body = (
        f"{args.caches} named caches of ~{args.prompt_tokens} tokens, then a restart; per cache one streamed chat "
        f"request (1 output token); median over {args.repeats} runs x {args.caches} caches, client-side TTFT, "
        f"both servers in one run.\n\n"
        + markdown_table(["first request after the restart", "TTFT", "vs warm"], rows)
        + f"\n\nThe background warm-up of the {args.caches} caches took {warm_up:.1f} s from the new server's start "
        f"(model already loaded). The state file: {statistics.median(r['state_bytes'] for r in runs) / 1024:.0f} KiB, "
        f"one save (what a named-cache create, update or delete waits for) "
        f"{statistics.median(r['save'] for r in runs) * 1000:.1f} ms."
    )
    print(body)
    update_section("cpu-warm-restart", "CPU: the first requests after a restart, with and without --state-dir", body)


if __name__ == "__main__":
    main()

"""Where a cached-prefix chat request's time to first token goes over HTTP on CPU, hop by hop
(issue #18), next to the engine alone, in one run whose sides alternate.

    .venv/bin/python bench/bench_cpu_http_hops.py [--rounds 10] [--spin-count 10000] [--write-docs]

The prompt of bench_cpu_ttft.py (a ~1538-token system prompt already cached + a ~15-token
question, the embedded model, 2 threads, one greedy token). Sides:
  - engine alone: LLMEngine in this process (OpenMP's default wait policy), and in a worker
    process with the engine core's passive OpenMP wait and with a short spin (GOMP_SPINCOUNT);
  - over HTTP, the official openai client, streaming: `radixserve serve` with the engine core
    process (passive, then --engine-spin-count) and with the engine thread (--engine-process off),
    each run through bench/http_hops_server.py, which timestamps the hops inside the server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_cpu_ttft import (  # noqa: E402
    NUM_BLOCKS, RADIXSERVE_WORKER, SYSTEM_TOKENS, LlamaWorker, engine_ttft, messages, prompt_ids, system_text,
)
from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.suite import _free_port  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from tests.live_server import wait_until_healthy  # noqa: E402

HOPS = [  # (label, from, to)
    ("client -> app", "client_send", "asgi_start"),
    ("parse + thread hop", "asgi_start", "build_start"),
    ("chat template + tokenize", "build_start", "build_end"),
    ("-> engine (arrival)", "build_end", "arrival"),
    ("arrival -> scheduled", "arrival", "scheduled"),
    ("step: forward + sample", "scheduled", "first_token"),
    ("first token -> handler", "first_token", "stream_out"),
    ("handler -> chunk sent", "stream_out", "content_sent"),
    ("chunk sent -> client", "content_sent", "client_first"),
]


def engine_worker(env: dict[str, str], threads: int) -> LlamaWorker:
    """radixserve_worker.py (the engine alone, one prompt of ids in, its TTFT out) under `env`."""
    worker = LlamaWorker.__new__(LlamaWorker)
    worker.process = subprocess.Popen([sys.executable, str(RADIXSERVE_WORKER), str(threads)], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    worker.info = worker._read()
    return worker


class HopsServer:
    def __init__(self, name: str, flags: list[str], threads: int, log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hops = log_dir / f"hops-{name.replace(' ', '_')}-{self.port}.jsonl"
        self.hops.write_text("")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HOPS_FILE": str(self.hops), "PYTHONPATH": str(ROOT)}
        self.log = (log_dir / f"server-{self.port}.log").open("wb")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "http_hops_server.py"), "serve",
                                         "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                                         "--num-blocks", str(NUM_BLOCKS), *flags],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip

    def wait_ready(self) -> None:
        wait_until_healthy(self.url, self.process, lambda: f"the server exited: see {self.log.name}")

    def side(self):
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

        def run(msgs: list[dict]) -> dict[str, float]:
            start, first = time.monotonic(), None
            stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=1, temperature=0,
                                                    stream=True)  # fmt: skip
            for chunk in stream:
                if chunk.choices and first is None and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                    first = time.monotonic()
            events = json.loads(self.hops.read_text().splitlines()[-1])
            return {**events, "client_send": start, "client_first": first, "ttft": first - start}

        return run

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spin-count", type=int, default=10000)
    parser.add_argument("--log-dir", default="/tmp/radixserve-bench-hops")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(show_progress=False))
    tokenizer = loaded.tokenizer
    system = system_text(tokenizer, SYSTEM_TOKENS, seed=1)
    engine = LLMEngine(EngineConfig(model=ModelConfig(show_progress=False), cache=CacheConfig(num_blocks=NUM_BLOCKS)),
                       loaded=loaded)  # fmt: skip
    spin = str(args.spin_count)
    workers = {"engine alone, passive OpenMP wait": engine_worker({"OMP_WAIT_POLICY": "PASSIVE"}, args.threads),
               f"engine alone, spin {spin}": engine_worker({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": spin},
                                                           args.threads)}  # fmt: skip
    servers = {"HTTP, engine process (default)": HopsServer("on", ["--engine-process", "on"], args.threads, log_dir),
               f"HTTP, engine process, --engine-spin-count {spin}":
                   HopsServer("spin", ["--engine-process", "on", "--engine-spin-count", spin], args.threads, log_dir),
               "HTTP, engine thread (--engine-process off)":
                   HopsServer("off", ["--engine-process", "off"], args.threads, log_dir)}  # fmt: skip
    try:
        for server in servers.values():
            server.wait_ready()
        sides = {"engine alone, this process (OpenMP default)": lambda m: {"ttft": engine_ttft(engine, prompt_ids(tokenizer, m))[0]}}
        sides.update({name: (lambda w: lambda m: {"ttft": w.ttft(prompt_ids(tokenizer, m))[0]})(w) for name, w in workers.items()})
        sides.update({name: server.side() for name, server in servers.items()})
        for side in sides.values():  # warm-up; the system prompt goes into every cache
            side(messages(system, 0))
        samples: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, side in sides.items():
                samples[name].append(side(messages(system, r + 1)))
                time.sleep(0.05)
    finally:
        for w in workers.values():
            w.close()
        for server in servers.values():
            server.stop()
    ms = lambda xs: f"{statistics.median(xs) * 1000:.1f}"  # noqa: E731
    rows = []
    for name, evs in samples.items():
        row = [name, len(evs), ms([e["ttft"] for e in evs])]
        for _, a, b in HOPS:
            values = [e[b] - e[a] for e in evs if e.get(a) is not None and e.get(b) is not None]
            row.append(ms(values) if values else "-")
        rows.append(row)
    table = markdown_table(["side", "rounds", "TTFT p50 ms", *[f"{label} ms" for label, _, _ in HOPS]], rows)
    body = (f"{SYSTEM_TOKENS}-token system prompt cached + a ~15-token question, the embedded model, {args.threads} "
            f"threads, one greedy token; the sides alternate in every round; medians (ms) of each hop, from "
            f"time.monotonic() readings in the client, the server (bench/http_hops_server.py) and the engine's own "
            f"request metrics. Load average at the end: {os.getloadavg()[0]:.1f}.\n\n{table}")  # fmt: skip
    print(body)
    if args.write_docs:
        update_section("cpu-http-hops", "CPU: where an HTTP request's time to first token goes (issue #18)", body)


if __name__ == "__main__":
    main()

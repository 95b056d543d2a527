"""CPU time per streamed token in the server process and in one Python client process, with the
engine core in its own process (on) or on the server's thread (off): where a streaming server
spends its host time once the engine is fast (dummy:tiny), and what one client process can carry.

    .venv/bin/python bench/bench_stream_cost.py [--model dummy:tiny] [--requests 64] [--out-len 128]

Prints one line per mode (CPU seconds from /proc, so Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_engine_process import _client_share  # noqa: E402
from tests.live_server import wait_until_healthy  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, args) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "radixserve", "serve", "--port", str(port), "--model", args.model,
                             "--engine-process", mode, "--log-level", "warning", "--max-num-seqs", "64"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc, lambda: "the server exited", poll=0.3)
        prompts = [[7] * 40 + [i, i + 1] for i in range(args.requests)]
        asyncio.run(_client_share(base, prompts[:8], 8, 16, time.time()))  # warm-up
        server0, wall0, client0 = cpu_seconds(proc.pid), time.time(), time.process_time()
        asyncio.run(_client_share(base, prompts, args.concurrency, args.out_len, time.time()))
        server1, wall1, client1 = cpu_seconds(proc.pid), time.time(), time.process_time()
    finally:
        proc.terminate()
        proc.wait()
    tokens = args.requests * args.out_len
    return (f"--engine-process {mode}: {tokens} tokens in {wall1 - wall0:.1f} s; server process CPU "
            f"{(server1 - server0) / tokens * 1e6:.0f} us/token; one client process {(client1 - client0) / tokens * 1e6:.0f} us/token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:tiny")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out-len", type=int, default=128)
    args = p.parse_args()
    for mode in ("on", "off"):
        print(measure(mode, args), flush=True)


if __name__ == "__main__":
    main()

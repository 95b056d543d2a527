"""What the first SDPA call at a new sequence length costs on this GPU (issue #18: the first burst
after start-up ran every kind of step slower than warm ones, its first 4096-token step 197-249 ms
against 85-92 ms warm, with no Triton compile left to blame).

The fresh-prefill path (radixserve/model/triton_attention.py) runs torch SDPA per sequence on the
Llama-3-8B attention shape; a backend that builds an execution plan per shape (cuDNN) pays it
once per new length. For each length: the first call and the median of the next ones, fresh
causal and, for a chunk over a cached prefix, the gathered path's bottom-right causal mask.

    PYTHONPATH=. python3 bench/probe_sdpa_first_call.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from radixserve.model.triton_attention import TritonAttentionBackend

HEADS, KV_HEADS, DIM = 32, 8, 128  # Llama-3-8B
FRESH_LENGTHS = (2176, 1920, 2048, 4096, 1000, 1001, 1536, 3000, 2176)  # 2176 twice: the 2nd is warm
GATHERED = ((1024, 2048), (1024, 3072), (1920, 4096), (1100, 3000))  # (new tokens, context)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def first_and_warm(fn, repeats: int = 5) -> tuple[float, float]:
    first = timed(fn)
    return first, statistics.median(timed(fn) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    backend = TritonAttentionBackend()
    scale = DIM**-0.5
    torch.manual_seed(0)
    # one unrelated call first: library loading is not what is measured
    warm_q = torch.randn(64, HEADS, DIM, device=dev, dtype=dt)
    warm_kv = torch.randn(64, KV_HEADS, DIM, device=dev, dtype=dt)
    backend._sdpa_causal(warm_q, warm_kv, warm_kv, scale)
    rows = []
    for n in FRESH_LENGTHS:
        q = torch.randn(n, HEADS, DIM, device=dev, dtype=dt)
        k = torch.randn(n, KV_HEADS, DIM, device=dev, dtype=dt)
        first, warm = first_and_warm(lambda: backend._sdpa_causal(q, k, k, scale))
        rows.append({"path": "fresh causal", "new": n, "context": n, "first_ms": first, "warm_ms": warm})
    block = 16
    for n, context in GATHERED:
        blocks = -(-context // block)
        k_cache = torch.randn(blocks, block, KV_HEADS, DIM, device=dev, dtype=dt)
        q = torch.randn(n, HEADS, DIM, device=dev, dtype=dt)
        ids = torch.arange(blocks, device=dev)
        first, warm = first_and_warm(lambda: backend.attend_gathered(q, k_cache, k_cache, ids, context, scale))
        rows.append({"path": "gathered lower-right", "new": n, "context": context, "first_ms": first, "warm_ms": warm})
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}")
    print("| path | new tokens | context | first call ms | warm ms | first - warm |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['new']} | {r['context']} | {r['first_ms']:.2f} | {r['warm_ms']:.3f} | {r['first_ms'] - r['warm_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

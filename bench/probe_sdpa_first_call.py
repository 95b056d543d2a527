"""What the first SDPA call at a new sequence length costs on this GPU (issue #18: the first burst
after start-up ran every kind of step slower than warm ones, its first 4096-token step 197-249 ms
against 85-92 ms warm, with no Triton compile left to blame).

The fresh-prefill path (radixserve/model/triton_attention.py) runs torch SDPA per sequence on the
Llama-3-8B attention shape; a backend that builds an execution plan per shape (cuDNN) pays it
once per new length. For each length: the first call and the median of the next ones, fresh
causal and, for a chunk over a cached prefix, the gathered path's bottom-right causal mask.
Then layouts: the model passes q, k, v as views of its QKV projection, and cuDNN keys its plans
by strides too; the backend gives SDPA contiguous inputs (padded or copied). Rows: the backend
on such views at a multiple of 256 (copied) and at a length it pads, SDPA itself on the views
(a layout the backend never uses: a plan of its own) and on contiguous inputs, for the copy's cost.

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


def qkv_views(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model passes them: views of one [n, (H + 2 KV) * D] projection output."""
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    return q.view(n, HEADS, DIM), k.view(n, KV_HEADS, DIM), v.view(n, KV_HEADS, DIM)


def layout_rows(backend: TritonAttentionBackend, scale: float, n: int = 4096) -> list[dict]:
    """After the fresh rows (which built the contiguous plan at n): the backend on QKV views, and
    SDPA called directly on views and on contiguous tensors."""
    def sdpa(q, k, v):
        qt, kt, vt = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale, is_causal=True, enable_gqa=True)

    q, k, v = qkv_views(n)
    qp, kp, vp = qkv_views(n - 96)  # padded to n
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    cases = (("backend, QKV views (copied)", n, lambda: backend._sdpa_causal(q, k, v, scale)),
             ("backend, QKV views (padded)", n - 96, lambda: backend._sdpa_causal(qp, kp, vp, scale)),
             ("SDPA on QKV views", n, lambda: sdpa(q, k, v)),
             ("SDPA on contiguous", n, lambda: sdpa(qc, kc, vc)))
    rows = []
    for path, length, fn in cases:
        first, warm = first_and_warm(fn, repeats=21)
        rows.append({"path": path, "new": length, "context": length, "first_ms": first, "warm_ms": warm})
    return rows


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
    rows += layout_rows(backend, scale)
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

"""Attention kernel microbenchmark on the GPU (Llama-3-8B attention shapes, one layer): the
paged decode and prefill kernels at a few launch shapes, against the bytes/flops floor, and
SDPA for fresh prefills. For choosing launch shapes; prints a table, writes nothing.

    python3 bench/bench_gpu_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from radixserve.model import triton_kernels as K  # noqa: E402
from radixserve.model.attention import AttentionMetadata  # noqa: E402

H, KV, D, PAGE = 32, 8, 128, 16
BW = 3.0e12  # measured device copy bandwidth here (KINDS.md), bytes/s


def setup(seqs, num_blocks_extra=64):
    need = sum(-(-(c + q) // PAGE) for c, q in seqs)
    nb = need + num_blocks_extra
    perm = torch.randperm(nb).tolist()
    kc = torch.randn(nb, PAGE, KV, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = [[perm.pop() for _ in range(-(-(c + q) // PAGE))] for c, q in seqs]
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [q for _, q in seqs], PAGE, device="cuda")
    T = sum(q for _, q in seqs)
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    return kc, vc, meta, q


def run(seqs, cfg, splits, label, floor_bytes=None, flops=None):
    kc, vc, meta, q = setup(seqs)
    out = torch.empty_like(q)
    max_q = max(q_ for _, q_ in seqs)
    block_q = cfg["block_m"] // 4
    nqb = -(-max_q // block_q)

    def f():
        K.paged_attention(q, kc, vc, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, D**-0.5,
                          num_seqs=len(seqs), n_qblocks=nqb, seq_ids=None, num_splits=splits, **cfg)  # fmt: skip

    f()  # compile outside the graph
    ms = triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median")
    extra = ""
    if floor_bytes:
        extra += f" {floor_bytes / (ms * 1e-3) / 1e12:.2f} TB/s"
    if flops:
        extra += f" {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s"
    print(f"{label:58s} {ms * 1000:8.1f} us{extra}", flush=True)
    return ms


def launch_overhead() -> None:
    """Host time per launch (a CPU-bound loop of tiny launches): what an eager step pays."""
    import time

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    kc, vc, meta, q = setup([(512, 1)])
    out = torch.empty_like(q)
    o = torch.empty_like(x)
    cases = {
        "torch add": lambda: x + x,
        "triton rms_norm, plain jit launch": lambda: K._rms_norm_kernel[(1,)](
            x, x, w, o, o, 4096, 4096, 4096, 4096, 4096, 1e-5, ADD=False, BLOCK=4096, num_warps=8),
        "triton rms_norm": lambda: K.rms_norm(x, w, 1e-5),
        "triton paged_attention (1 launch)": lambda: K.paged_attention(
            q, kc, vc, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, D**-0.5,
            num_seqs=1, n_qblocks=1, seq_ids=None, num_splits=1, block_m=16, block_n=128, num_warps=4, num_stages=2),
    }  # fmt: skip
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"launch overhead {name:40s} {(t1 - t0) / 500 * 1e6:6.1f} us per call (host)", flush=True)


def main() -> None:
    torch.manual_seed(0)
    launch_overhead()
    if "--launch-only" in sys.argv:
        return
    kv_bytes = lambda n: n * KV * D * 2 * 2  # noqa: E731
    print("-- decode (one layer, GPU time from a CUDA graph of the launches)")
    for B, ctx in [(1, 512), (1, 4096), (8, 2048), (32, 1024)]:
        seqs = [(ctx, 1)] * B
        auto = max(1, min(16, -(-132 // (B * KV))))
        for splits in sorted({1, auto}):
            for bn in (64, 128):
                cfg = dict(block_m=16, block_n=bn, num_warps=4, num_stages=2)
                run(seqs, cfg, splits, f"B={B} ctx={ctx} splits={splits} {cfg}", floor_bytes=kv_bytes(B * (ctx + 1)))
    print("-- short prefill over a long cached prefix (one layer)")
    for ctx, new in [(4032, 64), (2048, 128)]:
        seqs = [(ctx, new)]
        flops = 4 * new * (ctx + new / 2) * D * H
        for cfg in [dict(block_m=64, block_n=64, num_warps=4, num_stages=2), dict(block_m=64, block_n=128, num_warps=4, num_stages=2),
                    dict(block_m=128, block_n=128, num_warps=8, num_stages=2), dict(block_m=64, block_n=64, num_warps=4, num_stages=3)]:  # fmt: skip
            for splits in (4, 8, 16):
                run(seqs, cfg, splits, f"ctx={ctx} new={new} splits={splits} {cfg}", floor_bytes=kv_bytes(ctx + new), flops=flops)


if __name__ == "__main__":
    main()

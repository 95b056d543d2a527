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


COUNTERS = None


def reference(seqs, kc, vc, meta, q) -> torch.Tensor:
    """fp32 attention of each sequence's new tokens over its whole (gathered) context."""
    outs, start = [], 0
    for i, (c, n) in enumerate(seqs):
        blocks = meta.block_tables[i, : -(-(c + n) // PAGE)]
        k = kc[blocks].reshape(-1, KV, D)[: c + n].float().repeat_interleave(H // KV, 1)
        v = vc[blocks].reshape(-1, KV, D)[: c + n].float().repeat_interleave(H // KV, 1)
        qs = q[start : start + n].float()
        s = torch.einsum("qhd,khd->hqk", qs, k) * D**-0.5
        mask = torch.arange(c + n, device=q.device)[None, :] > (c + torch.arange(n, device=q.device))[:, None]
        s.masked_fill_(mask[None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        start += n
    return torch.cat(outs)


def run(seqs, cfg, splits, label, floor_bytes=None, flops=None, fuse=False, check=False, prefetch=False, layers=1):
    """Median GPU time of one launch (a CUDA graph of `layers` launches, each over its own KV
    pool as in a real forward, so L2 does not hold the keys between launches)."""
    global COUNTERS
    if COUNTERS is None:
        COUNTERS = torch.zeros(1 << 14, dtype=torch.int32, device="cuda")
    kc, vc, meta, q = setup(seqs)
    pools = [(kc, vc)] + [(torch.randn_like(kc), torch.randn_like(vc)) for _ in range(layers - 1)]
    out = torch.empty_like(q)
    max_q = max(q_ for _, q_ in seqs)
    block_q = cfg["block_m"] // 4
    nqb = -(-max_q // block_q)

    def f():
        for k_pool, v_pool in pools:
            K.paged_attention(q, k_pool, v_pool, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, D**-0.5,
                              num_seqs=len(seqs), n_qblocks=nqb, seq_ids=None, num_splits=splits,
                              counters=COUNTERS if fuse else None, prefetch=prefetch, **cfg)  # fmt: skip

    try:
        f()  # compile outside the graph
        ms = triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") / layers
    except Exception as e:  # e.g. out of shared memory / registers for a big tile
        print(f"{label:70s} failed: {type(e).__name__}: {str(e)[:80]}", flush=True)
        return None
    if layers > 1:
        K.paged_attention(q, kc, vc, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, D**-0.5,
                          num_seqs=len(seqs), n_qblocks=nqb, seq_ids=None, num_splits=splits,
                          counters=COUNTERS if fuse else None, prefetch=prefetch, **cfg)  # fmt: skip
    extra = ""
    if check:
        ref = reference(seqs, kc, vc, meta, q)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        extra += f" err {err:.1e}" + (" WRONG" if err > 2e-2 else "")
    if floor_bytes:
        extra += f" {floor_bytes / (ms * 1e-3) / 1e12:.2f} TB/s"
    if flops:
        extra += f" {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s"
    print(f"{label:70s} {ms * 1000:8.1f} us{extra}", flush=True)
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


def sweep_short_prefill() -> None:
    """Launch shapes for a short suffix over a long cached prefix (the cached-TTFT case), each
    timed over 32 layers' worth of KV pools (L2 cold, as in the model); prints the fastest."""
    shapes = [dict(block_m=64, block_n=bn, num_warps=4, num_stages=st) for bn, st in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3))]
    shapes += [dict(block_m=128, block_n=bn, num_warps=8, num_stages=st) for bn in (64, 128) for st in (2, 3)]
    for ctx, new in [(4032, 64), (2016, 32)]:
        results = []
        seqs = [(ctx, new)]
        print(f"-- sweep: {new} new tokens over {ctx} cached (per layer, 32 layers' pools)", flush=True)
        for cfg in shapes:
            for prefetch in (False, True):
                for splits in ((4, 8) if cfg["block_m"] == 64 else (2, 4)):
                    label = f"ctx={ctx} new={new} splits={splits} prefetch={int(prefetch)} {cfg}"
                    ms = run(seqs, cfg, splits, label, floor_bytes=kv_bytes(ctx + new), fuse=True, check=True,
                             prefetch=prefetch, layers=32)  # fmt: skip
                    if ms is not None:
                        results.append((ms, label))
        print(f"-- fastest for {new} over {ctx}:", flush=True)
        for ms, label in sorted(results)[:8]:
            print(f"   {ms * 1000:7.1f} us  {label}", flush=True)


def gather_vs_paged() -> None:
    """A prefill chunk over a cached prefix: the paged kernel (as the backend would launch it)
    against gathering the context's K/V and running SDPA flash (bottom-right causal), per layer
    over 32 layers' pools; for picking GATHER_SDPA_MIN_QUERY."""
    from radixserve.model.triton_attention import TritonAttentionBackend

    backend = TritonAttentionBackend()
    for ctx, new in [(16, 2140), (16, 512), (256, 256), (512, 512), (1024, 1024), (2048, 512), (4096, 1024), (4096, 512), (6144, 2048), (0, 2048)]:
        seqs = [(ctx, new)]
        kc, vc, meta, q = setup(seqs)
        pools = [(kc, vc)] + [(torch.randn_like(kc), torch.randn_like(vc)) for _ in range(31)]
        out = torch.empty_like(q)
        meta_paged = AttentionMetadata.build([meta.block_tables[0].tolist()], [ctx], [new], PAGE, device="cuda")
        meta_paged.lengths_are_nominal = True  # the plan then takes the paged kernel, whatever the lengths

        def paged():
            for k_pool, v_pool in pools:
                meta_paged.backend_state.pop("triton", None)
                backend.attend(q, k_pool, v_pool, meta_paged, D**-0.5)

        blocks = meta.block_tables[0, : -(-(ctx + new) // PAGE)]

        def gathered():
            for k_pool, v_pool in pools:
                out.copy_(backend.attend_gathered(q, k_pool, v_pool, blocks, ctx + new, D**-0.5))

        times = {}
        for name, fn in (("paged", paged), ("gather+sdpa", gathered)):
            fn()
            times[name] = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / 32
        ref = reference(seqs, kc, vc, meta, q)
        err = ((backend.attend_gathered(q, kc, vc, blocks, ctx + new, D**-0.5).float() - ref).norm() / ref.norm()).item()
        print(f"ctx={ctx:5d} new={new:5d}  paged {times['paged'] * 1000:8.1f} us   gather+sdpa {times['gather+sdpa'] * 1000:8.1f} us"
              f"   ratio {times['paged'] / times['gather+sdpa']:.2f}   gather err {err:.1e}", flush=True)


def sweep_long_prefill() -> None:
    """Launch shapes of the paged kernel for long chunks (a tiny or a long cached prefix)."""
    shapes = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
              for bm, w in ((64, 4), (128, 4), (128, 8)) for bn in (32, 64, 128) for st in (2, 3)]  # fmt: skip
    for ctx, new in [(16, 2140), (2048, 2048)]:
        results = []
        print(f"-- sweep: {new} new tokens over {ctx} cached (per layer, 32 layers' pools)", flush=True)
        for cfg in shapes:
            ms = run([(ctx, new)], cfg, 1, f"ctx={ctx} new={new} {cfg}", fuse=True, check=True, layers=32)
            if ms is not None:
                results.append((ms, f"{cfg}"))
        for ms, label in sorted(results)[:6]:
            print(f"   {ms * 1000:7.1f} us  {label}", flush=True)


def kv_bytes(n: int) -> int:
    return n * KV * D * 2 * 2


def main() -> None:
    torch.manual_seed(0)
    if "--gather" in sys.argv:
        if "--sweep-long" in sys.argv:
            sweep_long_prefill()
        gather_vs_paged()
        return
    if "--sweep" in sys.argv:
        sweep_short_prefill()
        for B, ctx in [(1, 4096), (2, 4096), (32, 1024)]:
            for splits in sorted({max(1, min(16, 132 // (B * KV))), max(1, min(16, -(-132 // (B * KV))))}):
                for prefetch in (False, True):
                    cfg = dict(block_m=16, block_n=128, num_warps=4, num_stages=2)
                    run([(ctx, 1)] * B, cfg, splits, f"decode B={B} ctx={ctx} splits={splits} prefetch={int(prefetch)}",
                        floor_bytes=kv_bytes(B * (ctx + 1)), fuse=True, check=True, prefetch=prefetch, layers=32)  # fmt: skip
        return
    launch_overhead()
    if "--launch-only" in sys.argv:
        return
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

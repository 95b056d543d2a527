"""The batch-invariant Triton matmul on the device, kernel level (needs CUDA and Triton):

    PYTHONPATH=. python3 bench/bench_batch_invariant_matmul.py [--out DIR] [--quick]

1. bits: for the Llama-3-8B projection shapes, every candidate tile shape (the M buckets of
   radixserve/model/matmul_tiles.py and alternatives), split and unsplit, at M = 1 ... 4096 must
   give each row exactly the bits of the prefill configuration at M = 4096 (the assumption the
   deterministic mode rests on: tile shape changes no bits when the K order is fixed);
2. speed: each candidate against cuBLAS (F.linear) at M = 1, 32, 64, 4096, CUDA-graph timed
   (triton.testing.do_bench_cudagraph), and the whole model's matmuls per step (32 layers of
   qkv, o, gate_up, down; the LM head on one row per sequence) so the engine-level ratios can be
   split into matmul and the rest.

Writes bench_batch_invariant_matmul.json into --out (default $OUT) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402

from radixserve.model import matmul_tiles  # noqa: E402
from radixserve.model.matmul_tiles import MatmulTiles, ReductionOrder, tiles_for  # noqa: E402
from radixserve.model.triton_batch_invariant import BatchInvariantMatmul  # noqa: E402

# Llama-3-8B: (name, N, K, per-step count)
SHAPES = [("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32), ("down", 4096, 14336, 32),
          ("lm_head", 128256, 4096, 1)]  # fmt: skip
_T = MatmulTiles
# K orders to compare, each with (M -> (tiles, split K) pairs to time); within a design every tile
# shape is also checked for bits at every M against the design's first M=4096 tile. "chunked" is
# matmul_tiles' order (1024-wide K chunks); the first pair per M is the shipped bucket.
DESIGNS = {
    "chunked": (ReductionOrder(64, 16), {
        1: [(_T(16, 128, 4, 4), True), (_T(16, 64, 4, 5), True), (_T(16, 256, 4, 3), True)],
        32: [(_T(32, 64, 4, 5), True), (_T(32, 128, 4, 4), True)],
        64: [(_T(64, 64, 4, 4), True), (_T(32, 64, 4, 5), True), (_T(64, 128, 4, 4), True)],
        4096: [(_T(128, 256, 8, 3), False), (_T(128, 256, 8, 4), False), (_T(256, 128, 8, 3), False)],
    }),
}
CHECK_ROWS = (1, 17, 64, 100, 300, 4096)


def log(*args) -> None:
    print(*args, flush=True)


def time_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=6) * 1000


def attention_speed() -> dict:
    """One layer's attention of the Llama-3-8B shape (32 heads, 8 KV heads, 128 dims, bf16, block
    16) in the engine's four workloads: the default plan against the deterministic one (and the
    deterministic one with the split rule forced each way), CUDA-graph timed, eager metadata."""
    import radixserve.model.triton_attention as TA
    from radixserve.model.attention import AttentionMetadata

    block_size, heads, kvh, dim = 16, 32, 8, 128
    workloads = {"prefill 4096": [(0, 4096)], "4032 cached + 64": [(4032, 64)], "decode b1 ctx 512": [(511, 1)],
                 "decode b32 ctx 1024": [(1023, 1)] * 32}  # fmt: skip
    out: dict = {}
    for name, seqs in workloads.items():
        blocks_per = -(-max(c + n for c, n in seqs) // block_size)
        pool = blocks_per * len(seqs) + 1
        k_cache = torch.randn(pool, block_size, kvh, dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = [list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(len(seqs))]
        T = sum(n for _, n in seqs)
        q = torch.randn(T, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, kvh, dim, device="cuda", dtype=torch.bfloat16)
        row = {}
        for mode, det, split in (("default", False, None), ("deterministic", True, None),
                                 ("det chunks walked", True, False), ("det chunk per program", True, True)):  # fmt: skip
            backend = TA.TritonAttentionBackend()
            backend.set_deterministic(det, 8192)
            backend.deterministic_split = split
            meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [n for _, n in seqs], block_size, device="cuda")
            row[mode] = time_us(lambda b=backend, m=meta: b.attend(q, k_cache, v_cache, m, dim**-0.5, k=k, v=k))
        out[name] = row
        log(f"[attention] {name}: " + ", ".join(f"{m} {v:.1f} us" for m, v in row.items())
            + f"; deterministic/default {row['deterministic'] / row['default']:.2f}x")  # fmt: skip
    return out


def probe_design(args, results, mm, design, order, cands, shipped, name_dt, name, n, k, x, w, cublas) -> None:
    """Bits of every candidate tile (split and not) against this design's prefill tile at M=4096,
    then (unless --quick) the candidates' speed."""
    prefill = cands[4096][0][0]
    ref = mm.linear(x, w, tiles=prefill, split=False)
    err = ((ref.float() - cublas).norm() / cublas.norm()).item()
    bad = []
    tried = {t for pairs in cands.values() for t, _ in pairs}
    if order == shipped:
        tried |= {tiles_for(m, name_dt) for m in CHECK_ROWS}
    for tiles in sorted(tried, key=lambda t: (t.block_m, t.block_n, t.num_warps, t.num_stages)):
        label = f"{tiles.block_m}x{tiles.block_n}w{tiles.num_warps}s{tiles.num_stages}"
        for split in (False, True):
            for m in CHECK_ROWS:
                if m == 4096 and (split or tiles.block_m < 64):  # (a small-row tile never sees a prefill)
                    continue
                try:
                    same = torch.equal(mm.linear(x[:m], w, tiles=tiles, split=split), ref[:m])
                except Exception as e:  # e.g. a tile that does not fit this GPU: say so, go on
                    same = False
                    log(f"[bits] {label} split={split} M={m}: {type(e).__name__}: {e}")
                if not same:
                    bad.append(f"{label} split={split} M={m}")
    if order == shipped:
        for m in CHECK_ROWS:  # the shipped choice (bucket + split rule)
            if not torch.equal(mm.linear(x[:m], w), ref[:m]):
                bad.append(f"default M={m}")
    results["bits"][f"{design} {name}"] = {"rel_err_vs_cublas": err, "mismatches": bad}
    log(f"[bits] {design} {name} N={n} K={k}: rel err vs cuBLAS {err:.2e}, mismatches {len(bad)} {bad[:8]}")
    if args.quick:
        return
    for m, pairs in cands.items():
        xm = x[:m].contiguous()
        row = results["speed"].setdefault(f"{name} M={m}", {})
        if "cublas_us" not in row:
            row["cublas_us"] = time_us(lambda: F.linear(xm, w))
        if order == shipped:
            row["chosen_us"] = time_us(lambda: mm.linear(xm, w))
        for tiles, split in pairs:
            key = f"{design} {tiles.block_m}x{tiles.block_n}w{tiles.num_warps}s{tiles.num_stages}{'+split' if split else ''}"
            try:
                row[key] = time_us(lambda t=tiles, sp=split: mm.linear(xm, w, tiles=t, split=sp))
            except Exception as e:  # e.g. a tile that does not fit this GPU
                log(f"[speed] {name} M={m} {key}: {type(e).__name__}: {e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--quick", action="store_true", help="bits only, no timing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (code paths only)")
    args = parser.parse_args()
    global SHAPES, CHECK_ROWS
    device, dtype = "cuda", torch.bfloat16
    if args.smoke:  # the interpreter's bf16 is not usable: fp32 (one tile rule, but every code path)
        device, dtype, args.quick = "cpu", torch.float32, True
        SHAPES, CHECK_ROWS = [("tiny", 96, 200, 1)], (1, 17, 4096)
    torch.manual_seed(0)
    mm = BatchInvariantMatmul()
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
                     "bits": {}, "speed": {}, "model_ms": {}}  # fmt: skip
    t0 = time.perf_counter()
    mismatches = 0
    name_dt = "bfloat16" if dtype == torch.bfloat16 else "float32"
    shipped = matmul_tiles.REDUCTION[name_dt]
    if not args.quick:
        try:
            results["attention_us"] = attention_speed()
        except Exception:
            traceback.print_exc()
    for name, n, k, _ in SHAPES:
        w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
        x = torch.randn(4096, k, device=device).to(dtype)
        cublas = F.linear(x, w).float()
        for design, (order, cands) in DESIGNS.items():
            matmul_tiles.REDUCTION[name_dt] = order
            try:
                probe_design(args, results, mm, design, order, cands, shipped, name_dt, name, n, k, x, w, cublas)
            except Exception as e:  # one broken design must not hide the other
                traceback.print_exc()
                results["bits"][f"{design} {name}"] = {"error": f"{type(e).__name__}: {e}"}
                mismatches += 1
                continue
            mismatches += len(results["bits"][f"{design} {name}"]["mismatches"])
        matmul_tiles.REDUCTION[name_dt] = shipped
        if not args.quick:
            for m in DESIGNS["chunked"][1]:
                row = results["speed"].get(f"{name} M={m}", {})
                base = row.get("cublas_us", float("nan"))
                ranked = sorted((v, key) for key, v in row.items() if key != "cublas_us")
                log(f"[speed] {name} M={m}: cuBLAS {base:.1f} us; "
                    + ", ".join(f"{key} {v:.1f} ({v / base:.2f}x)" for v, key in ranked[:6]))  # fmt: skip
        del w, x, cublas
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.out:  # what a timeout would cut short stays
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "bench_batch_invariant_matmul.json").write_text(json.dumps(results, indent=1))
    if not args.quick:
        try:
            model_summary(results)
        except Exception:
            traceback.print_exc()
    results["mismatches"] = mismatches
    results["seconds"] = time.perf_counter() - t0
    log(f"[bits] total mismatches: {mismatches}; {results['seconds']:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "bench_batch_invariant_matmul.json").write_text(json.dumps(results, indent=1))


def model_summary(results: dict) -> None:
    """The matmuls of one model step per M: cuBLAS against each design's best tile per shape."""
    for m in DESIGNS["chunked"][1]:
        best_by_design = {}
        cublas_ms = 0.0
        for name, n, k, count in SHAPES:
            row = results["speed"][f"{name} M={m}"]
            cublas_ms += row["cublas_us"] * count / 1000
            for key, v in row.items():
                for design in (*DESIGNS, "chosen"):
                    if key.startswith(design):
                        best_by_design[(design, name)] = min(v, best_by_design.get((design, name), float("inf")))
        totals = {d: sum(best_by_design[(d, name)] * count for name, _, _, count in SHAPES) / 1000
                  for d in (*DESIGNS, "chosen") if all((d, name) in best_by_design for name, *_ in SHAPES)}  # fmt: skip
        results["model_ms"][m] = {"cublas": cublas_ms, **totals}
        log(f"[model] matmuls of one step at M={m} (LM head on M rows): cuBLAS {cublas_ms:.2f} ms; "
            + ", ".join(f"{d} {v:.2f} ms ({v / cublas_ms:.2f}x)" for d, v in totals.items()) + " (designs: best tile each)")  # fmt: skip


if __name__ == "__main__":
    main()

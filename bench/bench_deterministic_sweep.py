"""Candidate kernels and tiles for deterministic mode's matmul and attention, on the device (issue #17):

    PYTHONPATH=. python3 bench/bench_deterministic_sweep.py [--out DIR] [--smoke] [--skip matmul|attention] [--ms 1,32,64]

For each Llama-3-8B projection shape and each workload's M (1 = decode b1, 32 = decode b32,
64 = the cached TTFT's 64 new tokens, 4096 = a cold prefill), every candidate (kernel "nested" /
"flat" / "flat_tma" / "stream_tma", tile, warps, stages, load width, programs per SM, split K) is

1. checked for bits: at M = 1, 17, 64, 100, 300 (and 4096 for tiles of 64+ rows) each row must be
   exactly the row of the shipped prefill launch (nested 128x256, unsplit, M = 4096) - the
   guarantee: whatever bucket serves a row, its bits are the same;
2. timed against cuBLAS (F.linear), CUDA-graph timed (triton.testing.do_bench_cudagraph).

Attention: deterministic-mode launch configs of the paged kernel (query tile rows, warps, stages,
the flat walk; the key tile (64) and chunk (16 tiles) that fix the order stay), one Llama-3-8B
layer (32 heads, 8 KV heads, 128 dims, block 16) in the four workloads: each candidate's output
must equal the shipped config's bit for bit in every workload; timed against the default plan.

Writes matmul_sweep.md (per shape and M: cuBLAS, the shipped choice, the best candidate with equal
bits; per M the matmuls of one model step; per M the fastest single tile with equal bits under the
shipped split rule - a bucket's constant, as code to paste into matmul_tiles._HALF_BUCKETS; the
attention table), matmul_sweep.json and best_buckets.json (the bfloat16 buckets with those
constants: `bench_deterministic_gpu.py --buckets` runs them) into --out (default $OUT).
--smoke runs tiny fp32 shapes on CPU under TRITON_INTERPRET=1 (code paths only, no timing).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from radixserve.model import matmul_tiles as MT  # noqa: E402
from radixserve.model import triton_attention as TA  # noqa: E402
from radixserve.model.matmul_tiles import MatmulTiles as T  # noqa: E402
from radixserve.model.triton_batch_invariant import BatchInvariantMatmul  # noqa: E402

# Llama-3-8B: (name, N, K, per-step count); the LM head runs on one row per sequence, so it is
# timed at the decode Ms only.
SHAPES = [("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32), ("down", 4096, 14336, 32),
          ("lm_head", 128256, 4096, 1)]  # fmt: skip
REFERENCE = (T(128, 256, 8, 3), False)  # the shipped prefill launch
# M -> candidates (tiles, split K: None = the shipped rule, by output tiles per SM); the shipped
# bucket's choice is timed as "shipped" besides.
CANDIDATES: dict[int, list[tuple[T, bool | None]]] = {
    1: [
        (T(16, 128, 4, 4, "flat"), None),
        (T(16, 128, 4, 4, "flat_tma"), None),
        (T(16, 64, 4, 6, "flat_tma"), None),
        (T(16, 256, 4, 3, "flat_tma"), None),
        (T(16, 128, 4, 4, "flat_tma", 128), None),
        (T(16, 128, 4, 3, "nested", 128), None),
        (T(16, 128, 4, 4, "stream_tma", per_sm=2), None),
        (T(16, 128, 4, 4, "stream_tma", per_sm=3), None),
    ],
    32: [
        (T(32, 64, 4, 5, "flat_tma"), None),
        (T(32, 128, 4, 4, "flat_tma"), None),
        (T(32, 64, 4, 4, "flat_tma", 128), None),
        (T(32, 64, 4, 5, "stream_tma", per_sm=3), None),  # 53 KB, 114-122 regs
        (T(32, 64, 4, 5, "stream_tma", per_sm=4), None),
        (T(32, 128, 4, 4, "stream_tma", per_sm=3), None),  # 70 KB, 168 regs
        (T(32, 256, 4, 3, "stream_tma", per_sm=2), None),  # 90 KB, 255 regs
        (T(16, 128, 4, 4, "stream_tma", per_sm=3), None),  # 64 KB
    ],
    64: [
        (T(64, 64, 4, 4, "flat_tma"), None),
        (T(64, 64, 4, 6, "flat_tma"), None),
        (T(64, 64, 4, 8, "flat_tma"), None),
        (T(64, 64, 4, 4, "flat_tma"), True),
        (T(64, 32, 4, 6, "flat_tma"), None),
        (T(32, 64, 4, 5, "flat_tma"), None),
        (T(64, 128, 4, 4, "flat_tma"), None),
        (T(64, 128, 4, 6, "flat_tma"), None),
        (T(64, 128, 8, 4, "flat_tma"), None),
        (T(64, 256, 8, 3, "flat_tma"), None),
        (T(64, 64, 4, 4, "flat_tma", 128), None),
        (T(64, 128, 4, 3, "flat_tma", 128), None),
        # stream-K over whole chunks: no wave tail, the pipeline runs across chunks and tiles. per_sm
        # only where that many programs fit on an SM (shared memory, registers: sm_90 compile, Triton 3.6)
        (T(64, 64, 4, 4, "stream_tma", per_sm=2), None),  # 82 KB, 168-174 regs
        (T(64, 64, 4, 3, "stream_tma", per_sm=2), None),
        (T(64, 64, 4, 3, "stream_tma", per_sm=3), None),  # 66 KB
        (T(64, 64, 4, 6, "stream_tma", per_sm=1), None),  # 115 KB
        (T(64, 64, 4, 6, "stream_tma", per_sm=2), None),
        (T(64, 32, 4, 6, "stream_tma", per_sm=2), None),  # 82 KB, 120 regs
        (T(64, 128, 4, 3, "stream_tma", per_sm=2), None),  # 98 KB, 255 regs x 128 threads
        (T(64, 128, 4, 4, "stream_tma", per_sm=1), None),  # 131 KB
        (T(64, 128, 8, 4, "stream_tma", per_sm=1), None),  # 131 KB, 185 regs x 256 threads
        (T(64, 256, 8, 3, "stream_tma", per_sm=1), None),  # 188 KB
        (T(64, 128, 4, 3, "stream_tma", 128, per_sm=1), None),  # 180 KB
        (T(32, 128, 4, 4, "stream_tma", per_sm=3), None),  # 70 KB
    ],
    4096: [
        (T(128, 256, 8, 3, "flat"), False),
        (T(128, 256, 8, 3, "flat_tma"), False),
        (T(128, 256, 8, 4, "flat_tma"), False),
        (T(128, 128, 8, 4, "flat_tma"), False),
        (T(256, 128, 8, 3, "flat_tma"), False),
        (T(128, 256, 8, 3, "persistent_tma"), False),
        (T(128, 256, 8, 4, "persistent_tma"), False),
        (T(128, 128, 8, 4, "persistent_tma"), False),
        (T(128, 256, 8, 2, "flat_tma", 128), False),
        (T(128, 128, 8, 3, "flat_tma", 128), False),
        (T(128, 256, 8, 2, "nested", 128), False),
    ],
}
CHECK_ROWS = (1, 17, 64, 100, 300, 4096)


def log(*args) -> None:
    print(*args, flush=True)


def label(tiles: T, split: bool | None) -> str:
    lk = f"k{tiles.load_k}" if tiles.load_k else ""
    lk += f"p{tiles.per_sm}" if tiles.kernel in ("persistent_tma", "stream_tma") else ""
    how = {None: "+rule", True: "+split", False: ""}[split]
    return f"{tiles.kernel} {tiles.block_m}x{tiles.block_n}w{tiles.num_warps}s{tiles.num_stages}{lk}{how}"


def time_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=6) * 1000


# Deterministic attention launch configs (TA.DETERMINISTIC_CFG's keys); the first is the shipped one.
# `split_tiles`: the key chunk (TA.DETERMINISTIC_SPLIT_TILES), another order: bits differ from the
# shipped build by design, timed to see what shorter chunks buy (more programs per KV head in
# decode) and cost (a fold per chunk in the prefill walk; 2-32 tiles: docs/benchmarks.md
# gpu-deterministic-order). `long`: the config for queries past the last bound of
# TA.DETERMINISTIC_CFG_BY_QUERY (its last entry). The first sweeps' candidates (2 stages, 16-
# and 32-row tiles, 4-warp 128-row tiles) are in docs/benchmarks.md gpu-deterministic-sweep.
SHIPPED_CFG = TA.DETERMINISTIC_CFG
LONG_CFG = TA.DETERMINISTIC_CFG_BY_QUERY[-1][1]
ATTENTION_CANDIDATES = [
    dict(SHIPPED_CFG),
    dict(SHIPPED_CFG, flat_walk=False),
    dict(SHIPPED_CFG, long=dict(LONG_CFG, flat_walk=False)),
    dict(SHIPPED_CFG, flat_walk=False, split_tiles=8),
    dict(SHIPPED_CFG, split_tiles=4, long=dict(LONG_CFG, flat_walk=True)),
]


# name: (sequences as (context, new tokens), lengths nominal: the CUDA-graph launch, whose split
# count covers max_model_len instead of this step's longest context)
ATTENTION_WORKLOADS = {"prefill 4096": ([(0, 4096)], False), "4032 cached + 64": ([(4032, 64)], False),
                       "4032 cached + 64 (graph)": ([(4032, 64)], True),
                       "decode b1 ctx 512": ([(511, 1)], False), "decode b1 ctx 512 (graph)": ([(511, 1)], True),
                       "decode b32 ctx 1024 (graph)": ([(1023, 1)] * 32, True)}  # fmt: skip
ATTENTION_MAX_MODEL_LEN = 8192  # bench_deterministic_gpu.py's engines


def attention_sweep(results, device="cuda", dtype=torch.bfloat16, timing=True, workloads=None, candidates=None) -> str:
    """Each candidate config against the shipped one: bits and time per workload."""
    from radixserve.model.attention import AttentionMetadata

    block_size, heads, kvh, dim = 16, 32, 8, 128
    workloads = workloads or ATTENTION_WORKLOADS
    candidates = candidates or ATTENTION_CANDIDATES
    shipped = dict(TA.DETERMINISTIC_CFG)
    shipped_split, shipped_by_query = TA.DETERMINISTIC_SPLIT_TILES, TA.DETERMINISTIC_CFG_BY_QUERY
    table: dict = {}
    torch.manual_seed(1)
    for wname, (seqs, nominal) in workloads.items():
        blocks_per = -(-max(c + n for c, n in seqs) // block_size)
        pool = blocks_per * len(seqs) + 1
        k_cache = torch.randn(pool, block_size, kvh, dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        tables = [list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(len(seqs))]
        T_ = sum(n for _, n in seqs)
        q = torch.randn(T_, heads, dim, device=device, dtype=dtype)
        k = torch.randn(T_, kvh, dim, device=device, dtype=dtype)

        def run(det: bool, cfg: dict | None):
            cfg = dict(cfg or shipped)
            TA.DETERMINISTIC_SPLIT_TILES = cfg.pop("split_tiles", shipped_split)
            TA.DETERMINISTIC_CFG_BY_QUERY = shipped_by_query[:-1] + ((shipped_by_query[-1][0], cfg.pop("long", LONG_CFG)),)
            TA.DETERMINISTIC_CFG = cfg
            backend = TA.TritonAttentionBackend()
            backend.set_deterministic(det, ATTENTION_MAX_MODEL_LEN)
            meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [n for _, n in seqs], block_size, device=device)
            meta = dataclasses.replace(meta, lengths_are_nominal=nominal)
            fn = lambda: backend.attend(q, k_cache, v_cache, meta, dim**-0.5, k=k, v=k)  # noqa: E731
            out = fn().clone()
            return out, (time_us(fn) if timing else float("nan"))

        try:
            _, default_us = run(False, None)
            ref, _ = run(True, shipped)
            row = table.setdefault(wname, {"default": default_us})
            for cfg in candidates:
                key = "a " + ",".join(f"{k_}={v_}" for k_, v_ in cfg.items())
                try:
                    out, us = run(True, cfg)
                except Exception as e:
                    log(f"[attention] {wname} {key}: {type(e).__name__}: {str(e)[:200]}")
                    results["errors"][key] = f"{type(e).__name__}: {str(e)[:200]}"
                    continue
                same = torch.equal(out, ref)
                row[key] = us
                if not same:
                    results["bits"].setdefault(key, []).append(wname)
                log(f"[attention] {wname} {key}: {us:.1f} us (default {default_us:.1f}){'' if same else ' BITS DIFFER'}")
        finally:
            TA.DETERMINISTIC_CFG, TA.DETERMINISTIC_SPLIT_TILES = shipped, shipped_split
            TA.DETERMINISTIC_CFG_BY_QUERY = shipped_by_query
    results["attention_us"] = table
    lines = ["", "Attention, one 8B layer, us (deterministic candidates; `!` = bits differ from the shipped config):", "",
             "| config | " + " | ".join(workloads) + " |", "|---|" + "---|" * len(workloads)]  # fmt: skip
    keys = ["default"] + ["a " + ",".join(f"{k_}={v_}" for k_, v_ in c.items()) for c in candidates]
    for key in keys:
        cells = []
        for wname in workloads:
            v = table.get(wname, {}).get(key)
            flag = "!" if wname in results["bits"].get(key, []) else ""
            cells.append(f"{v:.1f}{flag}" if v is not None else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compile_candidates(cands: list[tuple[T, bool | None]]) -> int:
    """One worker of --precompile: launch each candidate once per distinct compile (split or not,
    K of 4 or 14 chunks) on small weights, filling Triton's on-disk cache for the sweep."""
    torch.cuda.set_device(0)
    mm, done = BatchInvariantMatmul(), 0
    for k in (4096, 14336):
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        for n in (256, 4096):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for tiles, split in cands:
                for rows in (1, 4096) if n == 4096 else (1,):
                    try:
                        mm.linear(x[:rows], w, tiles=tiles, split=split)
                        done += 1
                    except Exception:  # the sweep reports it
                        pass
    torch.cuda.synchronize()
    return done


def precompile(workers: int) -> None:
    """Compile every candidate in `workers` processes at once (a fresh machine compiles ~70 kernels:
    one by one, most of the sweep's time)."""
    import multiprocessing

    cands = [REFERENCE] + [c for m in CANDIDATES for c in CANDIDATES[m]]
    slices = [cands[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = sum(pool.map(_compile_candidates, slices))
    log(f"[sweep] precompiled {done} launches in {workers} processes: {time.perf_counter() - t0:.0f} s")


def sweep_shape(mm, results, name, n, k, device, dtype, timing: bool) -> None:
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    x = torch.randn(max(CHECK_ROWS), k, device=device).to(dtype)
    ref = mm.linear(x, w, tiles=REFERENCE[0], split=REFERENCE[1])
    for m, cands in CANDIDATES.items():
        if name == "lm_head" and m > 64:
            continue
        xm = x[:m].contiguous()
        row = results["speed"].setdefault(f"{name} M={m}", {})
        if timing:
            row["cublas"] = time_us(lambda: F.linear(xm, w))
            row["shipped"] = time_us(lambda: mm.linear(xm, w))
        for tiles, split in cands:
            key = label(tiles, split)
            bad = []
            try:
                for rows in CHECK_ROWS:
                    if rows == 4096 and tiles.block_m < 64:
                        continue
                    if not torch.equal(mm.linear(x[:rows], w, tiles=tiles, split=split), ref[:rows]):
                        bad.append(rows)
                if timing:
                    row[key] = time_us(lambda t=tiles, sp=split: mm.linear(xm, w, tiles=t, split=sp))
            except Exception as e:  # a candidate that does not compile or fit: say so, go on
                log(f"[sweep] {name} M={m} {key}: {type(e).__name__}: {str(e)[:300]}")
                results["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            results["bits"].setdefault(key, []).extend(f"{name} M={r}" for r in bad)
            log(f"[sweep] {name} M={m} {key}: {row.get(key, float('nan')):.1f} us"
                + (f" (cuBLAS {row['cublas']:.1f}, shipped {row['shipped']:.1f})" if timing else "")
                + (f" BITS DIFFER at M={bad}" if bad else " bits ok"))  # fmt: skip
    # the shipped rule itself (bucket + split) at every checked M
    for rows in CHECK_ROWS:
        if not torch.equal(mm.linear(x[:rows], w), ref[:rows]):
            results["bits"].setdefault("shipped", []).append(f"{name} M={rows}")


def summary(results) -> str:
    """Markdown: per shape and M the best bitwise-equal candidate, then per M one model step."""
    ok = lambda key: key not in results["errors"] and not results["bits"].get(key)  # noqa: E731
    lines = ["| shape | M | cuBLAS us | shipped us (x cuBLAS) | best candidate with equal bits | us (x cuBLAS) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    best_per_m: dict[int, dict[str, str]] = {}
    step: dict[int, dict[str, float]] = {}
    for name, _, _, count in SHAPES:
        for m in CANDIDATES:
            row = results["speed"].get(f"{name} M={m}")
            if not row or "cublas" not in row:
                continue
            cands = sorted((v, key) for key, v in row.items() if key not in ("cublas", "shipped") and ok(key))
            best_v, best_key = cands[0] if cands else (row["shipped"], "shipped")
            if row["shipped"] <= best_v:
                best_v, best_key = row["shipped"], "shipped"
            cub = row["cublas"]
            lines.append(f"| {name} | {m} | {cub:.1f} | {row['shipped']:.1f} ({row['shipped'] / cub:.2f}x) | {best_key} | "
                         f"{best_v:.1f} ({best_v / cub:.2f}x) |")  # fmt: skip
            best_per_m.setdefault(m, {})[name] = best_key
            s = step.setdefault(m, {"cublas": 0.0, "shipped": 0.0, "best": 0.0})
            s["cublas"] += cub * count / 1000
            s["shipped"] += row["shipped"] * count / 1000
            s["best"] += best_v * count / 1000
    lines += ["", "Matmuls of one model step (32 layers of qkv, o, gate_up, down; the LM head on one row per "
              "sequence at M <= 64, left out at 4096):", "",
              "| M | cuBLAS ms | shipped ms | best per shape ms |", "|---|---|---|---|"]  # fmt: skip
    for m, s in step.items():
        lines.append(f"| {m} | {s['cublas']:.2f} | {s['shipped']:.2f} ({s['shipped'] / s['cublas']:.2f}x) | "
                     f"{s['best']:.2f} ({s['best'] / s['cublas']:.2f}x) |")  # fmt: skip
    results["best"] = best_per_m
    results["step_ms"] = step
    lines += bucket_choice(results, ok)
    bad = {k: v for k, v in results["bits"].items() if v}
    lines += ["", f"Bits: {len(bad)} candidates differ from the shipped prefill launch: "
              + ("; ".join(f"{k} at {v[:4]}" for k, v in bad.items()) or "none")
              + f". Errors: {results['errors'] or 'none'}"]  # fmt: skip
    return "\n".join(lines)


def tiles_code(tiles: T) -> str:
    """The MatmulTiles(...) to paste into matmul_tiles._HALF_BUCKETS."""
    default = T(16, 16, 4, 1)
    extra = "".join([f', "{tiles.kernel}"' if tiles.kernel != default.kernel or tiles.load_k or tiles.per_sm != 1 else "",
                     f", {tiles.load_k}" if tiles.load_k else "", f", per_sm={tiles.per_sm}" if tiles.per_sm != 1 else ""])  # fmt: skip
    return f"MatmulTiles({tiles.block_m}, {tiles.block_n}, {tiles.num_warps}, {tiles.num_stages}{extra})"


# A bucket changes only for a step at least this much faster: run to run, CUDA-graph times of one
# kernel move by about 1% (23:59 UTC run: M = 1 "won" by 0.05%).
MIN_BUCKET_GAIN = 0.02


def bucket_choice(results, ok) -> list[str]:
    """A bucket holds one tile for every shape: per swept M, each candidate that runs under the
    shipped split rule (what a bucket does) with equal bits on every shape, summed over one model
    step (the step table's counts); the fastest is the bucket's constant if it beats the shipped
    one by MIN_BUCKET_GAIN. Writes the bfloat16 buckets with those constants into results["buckets"] (--buckets of
    bench_deterministic_gpu.py takes that file)."""
    lines = ["", "One tile per M bucket (what `matmul_tiles._HALF_BUCKETS` holds): a step's matmuls, ms, the "
             "candidates under the shipped split rule with equal bits on every shape:", "",
             "| M | shipped ms | best candidate | ms (x shipped) | constant |", "|---|---|---|---|---|"]  # fmt: skip
    buckets = list(MT.BUCKETS["bfloat16"])
    for m, cands in CANDIDATES.items():
        rows = {name: results["speed"].get(f"{name} M={m}", {}) for name, *_ in SHAPES if name != "lm_head" or m <= 64}
        rows = {name: r for name, r in rows.items() if "shipped" in r}  # the LM head may be cut short: the rest weigh in
        if not rows or any(name not in rows for name, *_ in SHAPES if name != "lm_head"):
            continue  # a layer shape not timed (cut short)
        counts = {name: count for name, _, _, count in SHAPES}
        total = lambda key: sum(r[key] * counts[name] / 1000 for name, r in rows.items())  # noqa: E731
        shipped = total("shipped")
        eligible = [(total(label(t, sp)), label(t, sp), t) for t, sp in cands
                    if sp is None and ok(label(t, sp)) and all(label(t, sp) in r for r in rows.values())]  # fmt: skip
        if not eligible:
            continue
        best_ms, best_key, best_tiles = min(eligible, key=lambda e: e[0])
        wins = best_ms < shipped * (1 - MIN_BUCKET_GAIN)
        if wins:
            at = next(i for i, (top, _) in enumerate(buckets) if m <= top)
            buckets[at] = (buckets[at][0], best_tiles)
        lines.append(f"| {m} | {shipped:.3f} | {best_key} | {best_ms:.3f} ({best_ms / shipped:.3f}x) | "
                     f"{tiles_code(best_tiles) if wins else 'keep the shipped tile'} |")  # fmt: skip
    results["buckets"] = {"bfloat16": [[top, {f: getattr(t, f) for f in T.__slots__}] for top, t in buckets]}
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--skip", default="", help="comma-separated: matmul,attention")
    parser.add_argument("--ms", default="", help="comma-separated Ms of CANDIDATES to sweep (default: all)")
    parser.add_argument("--precompile", type=int, default=0, help="compile the candidates in this many processes first")
    args = parser.parse_args()
    global SHAPES, CHECK_ROWS, CANDIDATES, REFERENCE
    if args.ms:
        CANDIDATES = {m: CANDIDATES[m] for m in map(int, args.ms.split(","))}
    device, dtype, timing = "cuda", torch.bfloat16, True
    if args.smoke:  # code paths only: the interpreter's dot is numpy's, so load widths differ there
        device, dtype, timing = "cpu", torch.float32, False
        SHAPES, CHECK_ROWS = [("tiny", 96, 200, 1), ("whole-chunks", 96, 256, 1)], (1, 17, 40)
        MT.REDUCTION["float32"] = MT.ReductionOrder(16, 4)
        REFERENCE = (T(32, 32, 4, 2), False)
        CANDIDATES = {1: [(T(16, 32, 4, 2, "flat"), True), (T(16, 32, 4, 2, "flat_tma"), True)],
                      40: [(T(32, 64, 4, 2, "flat_tma"), False), (T(32, 32, 4, 2, "flat_tma", 32), False),
                           (T(16, 32, 4, 2, "stream_tma", per_sm=2), None)]}  # fmt: skip
    if args.precompile and device == "cuda" and "matmul" not in args.skip:
        try:
            precompile(args.precompile)
        except Exception:  # the sweep then compiles as it goes
            traceback.print_exc()
    torch.manual_seed(0)
    mm = BatchInvariantMatmul()
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                     "triton": triton.__version__, "bits": {}, "speed": {}, "errors": {}}  # fmt: skip
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    for name, n, k, _ in ([] if "matmul" in skip else SHAPES):
        try:
            sweep_shape(mm, results, name, n, k, device, dtype, timing)
        except Exception:
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
        if out:  # what a timeout would cut short stays
            out.mkdir(parents=True, exist_ok=True)
            if timing:
                (out / "matmul_sweep.md").write_text(summary(results) + "\n")
                (out / "best_buckets.json").write_text(json.dumps(results["buckets"], indent=1))
            (out / "matmul_sweep.json").write_text(json.dumps(results, indent=1))
    if timing and out and "matmul" not in skip:  # the matmul table stands even if the attention part is cut short
        (out / "matmul_sweep.md").write_text(summary(results) + "\n")
    attention_text = ""
    if "attention" not in skip:
        try:
            attention_text = attention_sweep(results) if timing else attention_sweep(
                results, "cpu", torch.float32, False, {"prefill 40": ([(0, 40)], False), "20 cached + 5": ([(20, 5)], False),
                                                          "decode b2 (graph)": ([(30, 1)] * 2, True)},
                [dict(block_m=16, block_n=16, num_warps=4, num_stages=1), dict(block_m=32, block_n=16, num_warps=4, num_stages=1, split_tiles=2)])
        except Exception:
            traceback.print_exc()
    text = (summary(results) + "\n" + attention_text) if timing else f"bits: {results['bits']}, errors: {results['errors']}\n{attention_text}"
    results["seconds"] = time.perf_counter() - t0
    log(text)
    log(f"[sweep] {results['seconds']:.0f} s")
    if out:
        (out / "matmul_sweep.json").write_text(json.dumps(results, indent=1))
        (out / "matmul_sweep.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

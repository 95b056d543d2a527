"""Compile the deterministic matmul's sweep candidates for sm_90 on a machine without a GPU, and
report what decides their speed before any device time is spent:

    PYTHONPATH=.:/work/triton-site python bench/compile_sm90.py [--ms 32,64] [--attention]

Per candidate (bench/bench_deterministic_sweep.py's CANDIDATES, bf16, split and unsplit, the
stream form for K of 4 and 14 chunks): shared memory (stages x (BLOCK_M + BLOCK_N) x BLOCK_K x 2
bytes when the K loop is software-pipelined, one stage's worth when it is not), registers and
spill stack (cuobjdump --dump-resource-usage of the cubin), and how many programs fit an SM.
--attention: the same for the paged attention kernel's launch configs on the Llama-3-8B shape
(32 query heads over 8 KV heads of 128), deterministic and default.
Needs Triton (its bundled ptxas and cuobjdump), not a GPU: `triton.compile` with a GPUTarget.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench import bench_deterministic_sweep as sweep  # noqa: E402
from radixserve.model import matmul_tiles as MT  # noqa: E402
from radixserve.model import triton_batch_invariant as TB  # noqa: E402
from radixserve.model import triton_kernels as TK  # noqa: E402

SM90_SMEM, SM90_REGS = 227 * 1024, 65536
POINTERS = ("a_ptr", "w_ptr", "bias_ptr", "c_ptr", "part_ptr", "counters_ptr")
INTS16 = ("N", "K", "stride_am", "stride_wn", "stride_cm")  # the 8B shapes: all multiples of 16


def _resources(kernel) -> tuple[int, int, int]:
    """(registers per thread, spill stack bytes, shared memory bytes) of a compiled kernel."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)), kernel.metadata.shared


def compile_one(tiles: MT.MatmulTiles, split: bool, n_chunks: int) -> dict:
    order = MT.REDUCTION["bfloat16"]
    tiles = MT.fit_stages(tiles, order.block_k, 2, SM90_SMEM)
    step_k = tiles.step_k(order)
    tma = tiles.kernel.endswith("_tma")
    sig = {"a_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "c_ptr": "*bf16", "part_ptr": "*fp32",
           "counters_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32",
           "a_desc": f"tensordesc<bf16[{tiles.block_m}, {step_k}]>" if tma else "*bf16",
           "w_desc": f"tensordesc<bf16[{tiles.block_n}, {step_k}]>" if tma else "*bf16"}  # fmt: skip
    const = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=step_k, CHUNK_STEPS=order.chunk // step_k, GROUP=MT.GROUP_M,
                 HAS_BIAS=False, IEEE=False)  # fmt: skip
    if tiles.kernel == "nested":
        fn = TB._matmul_kernel
        const.update(SPLIT=split)
    elif tiles.kernel == "stream_tma":
        fn = TB._matmul_kernel_stream
        const.update(N_CHUNKS=n_chunks, TMA=tma, NUM_STAGES=tiles.num_stages, INTERPRET=False)
    else:
        fn = TB._matmul_kernel_flat
        const.update(SPLIT=split, TMA=tma, NUM_STAGES=tiles.num_stages, PERSISTENT=tiles.kernel == "persistent_tma")
    sig.update({k: "constexpr" for k in const})
    sig = {name: sig[name] for name in fn.arg_names}  # constexpr indices follow the kernel's argument order
    names = list(sig)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in POINTERS + INTS16 if k in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    regs, stack, smem = _resources(kernel)
    fit = min(SM90_SMEM // max(smem, 1), SM90_REGS // (regs * 32 * tiles.num_warps))
    stage_bytes = (tiles.block_m + tiles.block_n) * step_k * 2
    return {"smem": smem, "pipelined": smem >= 2 * stage_bytes, "regs": regs, "stack": stack, "per_sm_fit": fit}


# (label, BLOCK_M, num_warps, num_stages, SPLIT_TILES, FLAT_WALK, SPLIT, PREFETCH)
ATTENTION_CONFIGS = [
    ("deterministic long query (128 rows, nested walk)", 128, 8, 3, 16, False, False, False),
    ("deterministic long query, flat walk", 128, 8, 3, 16, True, False, False),
    ("deterministic short query (64 rows, flat walk)", 64, 4, 3, 16, True, False, False),
    ("deterministic split chunk (64 rows)", 64, 4, 3, 16, False, True, False),
    ("default (128 rows)", 128, 8, 3, 0, False, False, True),
    ("default (64 rows)", 64, 4, 3, 0, False, False, True),
]


def compile_attention(block_m: int, warps: int, stages: int, split_tiles: int, flat: bool, split: bool, prefetch: bool):
    fn = TK._paged_attention_kernel
    names = fn.arg_names
    const = dict(NUM_KV_HEADS=8, GROUP=4, GROUP_P=4, HEAD_DIM=128, HEAD_DIM_P=128, PAGE=16, BLOCK_M=block_m, BLOCK_N=64,
                 SPLIT=split, FUSE_MERGE=split, PREFETCH=prefetch, USE_SEQ_IDS=False, IEEE=False, SPLIT_TILES=split_tiles,
                 CASCADE=False, FLAT_WALK=flat)  # fmt: skip
    fp32 = ("part_acc_ptr", "part_ml_ptr", "cascade_acc_ptr", "cascade_ml_ptr")
    ints = ("counters_ptr", "block_tables_ptr", "seq_lens_ptr", "query_start_ptr", "seq_ids_ptr", "cascade_len_ptr")
    sig = {}
    for name in names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32 else "*i32" if name in ints else "*bf16"
        else:
            sig[name] = "fp32" if name == "scale_log2e" else "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n.startswith("stride_")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return _resources(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)))


def attention_main() -> None:
    print("| attention launch | warps / stages | regs | spill stack | smem bytes |")
    print("|---|---|---|---|---|")
    for label, block_m, warps, stages, *rest in ATTENTION_CONFIGS:
        regs, stack, smem = compile_attention(block_m, warps, stages, *rest)
        print(f"| {label} | {warps} / {stages} | {regs} | {stack} | {smem} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,32,64")
    parser.add_argument("--attention", action="store_true", help="the paged attention kernel's launch configs instead")
    args = parser.parse_args()
    if args.attention:
        attention_main()
        return
    print("| M | candidate | split / chunks | smem bytes | pipelined | regs | spill stack | programs an SM fits |")
    print("|---|---|---|---|---|---|---|---|")
    for m in map(int, args.ms.split(",")):
        for tiles, split in [(MT.tiles_for(m, "bfloat16"), None)] + sweep.CANDIDATES[m]:  # the shipped bucket first
            variants = [(True, 4), (True, 14)] if tiles.kernel == "stream_tma" else [(False, 0), (True, 0)]
            for sp, chunks in variants:
                try:
                    r = compile_one(tiles, sp, chunks)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"| {m} | {sweep.label(tiles, split)} | {sp} / {chunks} | error: {type(e).__name__}: {str(e)[:120]} |")
                    continue
                how = f"{chunks} chunks" if tiles.kernel == "stream_tma" else ("split" if sp else "unsplit")
                print(f"| {m} | {sweep.label(tiles, split)} | {how} | {r['smem']} | {'yes' if r['pipelined'] else 'NO'} | "
                      f"{r['regs']} | {r['stack']} | {r['per_sm_fit']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

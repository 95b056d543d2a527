"""GPU (device): cascade attention (shared-prefix decode) against plain paged decode.

    PYTHONPATH=. python3 bench/bench_cascade_gpu.py [--skip kernels,speed] [--repeats 3] [--out DIR] [--previous JSON]

1. kernels: one layer's decode attention, Llama-3-8B shape (32 query heads, 8 KV heads, head dim
   128, bf16, block 16), 128 rows over ~2048-token shared prefixes + 200-300 own tokens each, in
   groups of 16 x 8, 4 x 32, and unshared (128 rows, nothing in common: the cost of the cascade
   launch when it has nothing to do), plus 32 rows in 4 groups; each timed over 4 layers' KV
   pools in one CUDA graph (L2 cold, as in a forward), median of do_bench_cudagraph; the error
   of each against plain attention; the bytes each must read and the bandwidth it reached. A
   small sweep of the prefix kernel's tile shape on the 8 x 16 case.
2. speed: the 8B table of bench/bench_gpu.py (cold prefill 4096, cached TTFT 4032 + 64, decode
   batch 1 and 32) with cascade attention on, then off, engines built in turn over one set of
   weights (none of these workloads shares a prefix between running rows: this is its overhead).

Writes the "gpu-cascade" section of docs/benchmarks.md and, with --out, bench_cascade_gpu.json
and a copy of benchmarks.md into DIR. The issue workload (req/s, step times) is
bench/probe_steps.py --cascade off,on (bench/device_cascade.sh runs both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import BENCHMARKS_MD, markdown_table, update_section  # noqa: E402
from radixserve.model import triton_attention as TA  # noqa: E402
from radixserve.model.attention import AttentionMetadata  # noqa: E402
from radixserve.model.cascade import CASCADE_ROWS, CascadeMetadata, max_chunks, plan_cascade  # noqa: E402

H, KV, D, PAGE = 32, 8, 128, 16
LAYERS = 4
RESULTS: dict = {}


def log(*args) -> None:
    print(*args, flush=True)


def setup(groups: int, rows_per_group: int, prefix: int, seed: int = 0):
    """Block tables of groups x rows decode rows (prefix tokens shared per group, 200-300 own
    each), LAYERS KV pools, q; the metadata with and without the cascade (padded to a CUDA
    graph's fixed chunk capacity, as DecodeGraphs does)."""
    rng = np.random.default_rng(seed)
    rows = groups * rows_per_group
    own = rng.integers(200, 301, rows)
    prefix_blocks = prefix // PAGE
    need = groups * prefix_blocks + int(sum(-(-o // PAGE) for o in own))
    perm = rng.permutation(need + 16).tolist()
    tables, ctx = [], []
    for g in range(groups):
        shared = [perm.pop() for _ in range(prefix_blocks)]
        for r in range(rows_per_group):
            o = int(own[g * rows_per_group + r])
            tables.append(shared + [perm.pop() for _ in range(-(-o // PAGE))])
            ctx.append(prefix + o - 1)
    num_blocks = need + 16
    pools = [(torch.randn(num_blocks, PAGE, KV, D, device="cuda", dtype=torch.bfloat16),
              torch.randn(num_blocks, PAGE, KV, D, device="cuda", dtype=torch.bfloat16)) for _ in range(LAYERS)]  # fmt: skip
    meta = AttentionMetadata.build(tables, ctx, [1] * rows, PAGE, device="cuda")
    q = torch.randn(rows, H, D, device="cuda", dtype=torch.bfloat16)
    # min_rows 2: time the kernel on every group size (the engine skips groups < CASCADE_MIN_ROWS)
    plan = plan_cascade(meta.block_tables.cpu().numpy(), np.asarray(meta.seq_lens_list), PAGE, min_rows=2)
    # Padded to the graph's capacity; with nothing shared every chunk slot is empty, as a CUDA
    # graph replays it.
    capacity = max_chunks(rows, min_rows=2)
    used = 0 if plan is None else plan.num_chunks
    chunk_rows = np.full((capacity, CASCADE_ROWS), -1, dtype=np.int64)
    chunk_prefix = np.zeros(capacity, dtype=np.int64)
    chunk_leader = np.zeros(capacity, dtype=np.int64)
    row_prefix = np.zeros(rows, dtype=np.int64)
    if plan is not None:
        chunk_rows[:used], chunk_prefix[:used], chunk_leader[:used] = plan.chunk_rows, plan.chunk_prefix, plan.chunk_leader
        row_prefix = plan.row_prefix
    t = lambda a: torch.from_numpy(a.reshape(-1)).cuda()  # noqa: E731
    cascade = CascadeMetadata(t(row_prefix), t(chunk_rows), t(chunk_prefix), t(chunk_leader), capacity)
    plain_tokens = sum(meta.seq_lens_list)
    cascade_tokens = (groups * prefix if rows_per_group > 1 else 0) + sum(
        s - (prefix if rows_per_group > 1 else 0) for s in meta.seq_lens_list)
    return pools, meta, q, cascade, plain_tokens, cascade_tokens


def attend_all(backend, pools, meta, q, out):
    for kc, vc in pools:
        out.copy_(backend.attend(q, kc, vc, meta, D**-0.5))


def time_case(label: str, groups: int, rows_per_group: int, prefix: int) -> dict:
    pools, meta, q, cascade, plain_tokens, cascade_tokens = setup(groups, rows_per_group, prefix)
    result = {"rows": groups * rows_per_group, "groups": groups, "prefix": prefix}
    outs = {}
    for mode in ("plain", "cascade"):
        backend = TA.TritonAttentionBackend()
        backend.cascade = mode == "cascade"
        meta.cascade = cascade if mode == "cascade" else None
        meta.backend_state.clear()
        out = torch.empty_like(q)
        attend_all(backend, pools, meta, q, out)  # compile and plan outside the graph
        torch.cuda.synchronize()
        ms = triton.testing.do_bench_cudagraph(lambda: attend_all(backend, pools, meta, q, out), rep=100,
                                               return_mode="median") / LAYERS  # fmt: skip
        outs[mode] = out.float().clone()
        tokens = plain_tokens if mode == "plain" else cascade_tokens
        bytes_ = tokens * KV * D * 2 * 2
        result[mode] = {"us": ms * 1000, "bytes": bytes_, "tb_per_s": bytes_ / (ms * 1e-3) / 1e12}
    err = ((outs["cascade"] - outs["plain"]).norm() / outs["plain"].norm()).item()
    result["rel_err"] = err
    result["speedup"] = result["plain"]["us"] / result["cascade"]["us"]
    log(f"{label:45s} plain {result['plain']['us']:8.1f} us ({result['plain']['tb_per_s']:.2f} TB/s)  cascade "
        f"{result['cascade']['us']:8.1f} us ({result['cascade']['tb_per_s']:.2f} TB/s)  {result['speedup']:.2f}x  err {err:.1e}"
        + ("  WRONG" if err > 2e-2 else ""))
    del pools
    torch.cuda.empty_cache()
    return result


def kernels() -> dict:
    cases = {
        "128 rows, 8 groups x 16, 2048 shared": (8, 16, 2048),
        "128 rows, 32 groups x 4, 2048 shared": (32, 4, 2048),
        "128 rows, nothing shared": (128, 1, 2048),
        "32 rows, 4 groups x 8, 2048 shared": (4, 8, 2048),
    }
    out = {label: time_case(label, *shape) for label, shape in cases.items()}
    # The prefix kernel's tile shape (block_n, warps, stages) on the first case.
    sweep = {}
    default = dict(TA.CASCADE_CFG)
    for cfg in (dict(block_n=128, num_warps=4, num_stages=3), dict(block_n=64, num_warps=4, num_stages=2),
                dict(block_n=32, num_warps=4, num_stages=4), dict(block_n=64, num_warps=8, num_stages=3)):
        TA.CASCADE_CFG = cfg
        try:
            r = time_case(f"  sweep {cfg}", 8, 16, 2048)
            sweep[json.dumps(cfg)] = r["cascade"]["us"]
        except Exception as e:  # noqa: BLE001 (a tile that does not fit: skip it)
            log(f"  sweep {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
    TA.CASCADE_CFG = default
    out["sweep_8x16_us"] = sweep
    # Prefix splits: work items per SM the split count aims at (1: ~3 splits at 128 rows).
    splits_sweep = {}
    for items, max_splits in ((2, 8), (4, 16)):
        TA.CASCADE_ITEMS_PER_SM, TA.CASCADE_MAX_SPLITS = items, max_splits
        r = time_case(f"  splits: {items} items per SM (max {max_splits})", 8, 16, 2048)
        splits_sweep[f"{items} items/SM"] = r["cascade"]["us"]
    TA.CASCADE_ITEMS_PER_SM, TA.CASCADE_MAX_SPLITS = 1, 8
    out["splits_8x16_us"] = splits_sweep
    return out


SPEED_KEYS = [
    ("prefill_4096_ms", "cold prefill, 4096 tokens"),
    ("ttft_4032_cached_64_new_ms", "TTFT, 4032 cached + 64 new"),
    ("decode_b1_ms", "decode, batch 1 (per token)"),
    ("decode_b32_ctx1024_ms", "decode, batch 32, 1024-token contexts (per step)"),
]


def section(argv: list[str]) -> str:
    parts = [f"Device command: `PYTHONPATH=. python3 bench/bench_cascade_gpu.py {' '.join(argv)}` "
             "(run by `bash bench/device_cascade.sh`)."]
    k = RESULTS.get("kernels")
    if k and "error" not in k:
        rows = []
        for label, r in k.items():
            if not isinstance(r, dict) or "plain" not in r:
                continue
            rows.append([label, f"{r['plain']['us']:.1f} us ({r['plain']['tb_per_s']:.2f} TB/s)",
                         f"{r['cascade']['us']:.1f} us ({r['cascade']['tb_per_s']:.2f} TB/s)",
                         f"{r['speedup']:.2f}x", f"{r['rel_err']:.1e}"])  # fmt: skip
        parts.append("### One layer's decode attention (Llama-3-8B shape, bf16, 200-300 own tokens per row; "
                     "4 layers' KV pools per CUDA graph, L2 cold; TB/s = the bytes each must read / time)\n\n"
                     + markdown_table(["rows", "plain", "cascade", "speedup", "rel. error vs plain"], rows))  # fmt: skip
        if k.get("splits_8x16_us"):
            parts.append("Prefix splits (8 x 16 case, cascade us; shipped: 1 item per SM, at most 8): "
                         + ", ".join(f"{c} {v:.1f}" for c, v in k["splits_8x16_us"].items()) + ".")
        if k.get("sweep_8x16_us"):
            parts.append("Prefix-kernel tile sweep (8 x 16 case, cascade us): "
                         + ", ".join(f"{c} {v:.1f}" for c, v in k["sweep_8x16_us"].items())
                         + f"; shipped {TA.CASCADE_CFG}.")
    probe = RESULTS.get("probe")
    if probe and probe.get("off") and probe.get("on"):
        rows = []
        for b_off, b_on in zip(probe["off"]["bursts"], probe["on"]["bursts"]):
            def kind(b, k):
                v = b["steps"].get(k)
                return f"{v['steps']} x {v['gpu_ms_mean']:.1f}" if v else "-"
            rows.append([b_off.get("arrival", "shuffled"), f"{b_off['req_per_s']:.1f}", f"{b_on['req_per_s']:.1f}",
                         f"{b_on['req_per_s'] / b_off['req_per_s']:.2f}x", kind(b_off, "decode-only"), kind(b_on, "decode-only"),
                         kind(b_off, "mixed"), kind(b_on, "mixed"), str(b_on.get("cascade_rows", 0))])  # fmt: skip
        parts.append("### The issue #18 workload (`bench/probe_steps.py --bursts 3 --arrival shuffled,grouped,shuffled --cascade "
                     "off,on`: 512 requests, 32 groups x 2048-token prefix, +128 new, 128 out; one engine per mode over "
                     "the same weights, in one process; steps as count x mean GPU ms)\n\n"
                     + markdown_table(["arrivals", "req/s off", "req/s on", "on / off", "decode-only off", "decode-only on",
                                       "mixed off", "mixed on", "rows cascaded"], rows))  # fmt: skip
    speed = RESULTS.get("speed", {})
    off, on = speed.get("off"), speed.get("on")
    if off and on and "error" not in off and "error" not in on:
        rows = [[label, f"{off[key]:.2f} ms", f"{on[key]:.2f} ms", f"{on[key] / off[key]:.2f}x"]
                for key, label in SPEED_KEYS if isinstance(off.get(key), (int, float)) and isinstance(on.get(key), (int, float))]
        parts.append("### Llama-3-8B speed table, cascade attention off vs on (nothing shared between running rows "
                     "here: the cost of having it on)\n\n" + markdown_table(["workload", "off", "on", "on / off"], rows))
    return "\n\n".join(parts)


def render(out: Path, date: str | None) -> None:
    """The gpu-cascade section from a finished `bash bench/device_cascade.sh` whose $OUT was
    copied to `out` (on a machine without the GPU)."""
    for name in ("speed/bench_cascade_gpu.json", "bench_cascade_gpu.json", "kernels.json"):
        if (out / name).exists():
            RESULTS.update({k: v for k, v in json.loads((out / name).read_text()).items() if k not in RESULTS})
    found = {m: out / f"probe-cascade_{m}.json" for m in ("off", "on")}
    if all(f.exists() for f in found.values()):
        RESULTS["probe"] = {m: json.loads(f.read_text()) for m, f in found.items()}
    log_text = (out / "cascade.log").read_text() if (out / "cascade.log").exists() else ""
    machine = next((line for line in log_text.splitlines() if line.startswith("NVIDIA")), "NVIDIA H200")
    host = next((line.split(":", 1)[1].strip() for line in log_text.splitlines() if line.startswith("Model name")), "")
    update_section("gpu-cascade", "GPU: cascade attention (shared-prefix decode)", section(["--skip speed"]),
                   command="bash bench/device_cascade.sh", machine=f"{machine.split(',')[0]}, host {host}".strip(", "),
                   date=date)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated: kernels,speed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--previous", default=None, help="a bench_cascade_gpu.json whose parts this run keeps")
    parser.add_argument("--probe", default=None, help="a folder with probe_steps.py's probe-cascade_{off,on}.json")
    parser.add_argument("--render", default=None, help="write the section from a device run's $OUT copied here")
    parser.add_argument("--render-date", default=None)
    args = parser.parse_args()
    if args.previous and Path(args.previous).exists():
        RESULTS.update(json.loads(Path(args.previous).read_text()))
    if args.probe:  # probe_steps.py --cascade off,on --json DIR/probe.json wrote these
        found = {m: Path(args.probe, f"probe-cascade_{m}.json") for m in ("off", "on")}
        if all(f.exists() for f in found.values()):
            RESULTS["probe"] = {m: json.loads(f.read_text()) for m, f in found.items()}
    skip = set(filter(None, args.skip.split(",")))

    if args.render:
        render(Path(args.render), args.render_date)
        return
    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}")

    def save() -> None:
        update_section("gpu-cascade", "GPU: cascade attention (shared-prefix decode)", section(sys.argv[1:]))
        if args.out:
            Path(args.out, "bench_cascade_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
            Path(args.out, "benchmarks.md").write_text(BENCHMARKS_MD.read_text())

    def attempt(name: str, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # keep going: one broken part must not hide the others
            traceback.print_exc()
            value = {"error": f"{type(e).__name__}: {e}"}
        log(f"[{name}] {time.perf_counter() - t0:.1f}s")
        return value

    if "kernels" not in skip:
        RESULTS["kernels"] = attempt("kernels", kernels)
        save()
    if "speed" not in skip:
        from bench.bench_gpu import dummy, free_memory, our_speed

        loaded = dummy("llama3-8b", max_model_len=8192)
        RESULTS["speed"] = {}
        for name, cascade in (("on", True), ("off", False)):  # on first: a warming machine favours off
            RESULTS["speed"][name] = attempt(f"speed cascade {name}", lambda c=cascade: our_speed(loaded, args.repeats, cascade=c))
            log(json.dumps(RESULTS["speed"][name], default=str))
            free_memory()
            save()
    save()
    log(section(sys.argv[1:]))


if __name__ == "__main__":
    main()

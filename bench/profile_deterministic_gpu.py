"""Where --deterministic's cost goes, per kernel (issue #17), on the device:

    PYTHONPATH=. python3 bench/profile_deterministic_gpu.py [--out DIR]

The Llama-3-8B shape (dummy bf16 weights), one engine per mode over the same weights (as
bench_deterministic_gpu.py's speed table builds them), each of the table's four workloads warmed
up once and then run under torch.profiler: a cold prefill of 4096 tokens, the TTFT of 4032 cached
+ 64 new tokens, 16 decode steps at batch 1 (512-token prompt) and 8 at batch 32 (1024-token
contexts). GPU time per kernel (CUDA graphs' kernels included), summed per step, grouped into
matmul / attention / other, default against deterministic. Writes profile_deterministic.md and
.json into --out (default $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_gpu import dummy, free_memory, log, rand_ids, run_until_done, ttft  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

WORKLOADS = ("cold prefill 4096", "TTFT 4032 cached + 64", "decode b1 (per step)", "decode b32 (per step)")


def category(name: str) -> str:
    low = name.lower()
    if "_matmul_kernel" in low:
        return "matmul (batch-invariant Triton)"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "gemv", "sm90_xmma", "cublas", "splitk")):
        return "matmul (cuBLAS)"
    if any(s in low for s in ("attn", "attention", "flash", "fmha", "sdpa")):
        return "attention"
    return "other"


def kernel_times(prof, steps: int) -> dict[str, float]:
    """GPU microseconds per kernel name, divided by the number of steps profiled."""
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name] += e.time_range.elapsed_us() / steps
    return dict(out)


def profiled(fn, steps: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    return kernel_times(prof, steps)


def decode_steps(engine: LLMEngine, rng, vocab: int, batch: int, prompt: int, steps: int):
    """A closure that prefills `batch` requests, then runs `steps` decode steps (the part profiled)."""

    def prepare():
        reqs = [engine.add_request(rand_ids(rng, prompt, vocab), SamplingParams(max_tokens=steps + 4, temperature=0,
                                                                               ignore_eos=True)) for _ in range(batch)]  # fmt: skip
        while not all(r.first_token_time is not None for r in reqs):
            engine.step()
        return reqs

    def run():
        for _ in range(steps):
            engine.step()

    return prepare, run


# (prefill, cached, new, decode-b1 prompt, decode-b32 prompt); --cpu-check shrinks them
SIZES = (4096, 4032, 64, 512, 1024)
ENGINE = dict(source="dummy:llama3-8b", dtype="bfloat16", device="cuda", max_model_len=8192)


def profile_mode(loaded, deterministic: bool, engines_built: list | None = None) -> dict[str, dict[str, float]]:
    vocab = loaded.arch.vocab_size
    rng = random.Random(7)
    prefill, cached, new, b1_prompt, b32_prompt = SIZES
    config = EngineConfig(
        model=ModelConfig(**ENGINE, deterministic=deterministic),
        cache=CacheConfig(gpu_memory_utilization=0.85),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192),
    )
    engine = LLMEngine(config, loaded=loaded)
    if engines_built is not None:  # --cpu-check: a weak reference, to see the engine go
        engines_built.append(weakref.ref(engine))
    log(f"[profile] deterministic={deterministic}: {engine.num_kv_blocks} KV blocks, "
        f"{torch.cuda.memory_allocated() / 1e9 if torch.cuda.is_available() else 0:.1f} GB allocated")  # fmt: skip
    out = {}
    ttft(engine, rand_ids(rng, prefill, vocab))  # warm-up
    out[WORKLOADS[0]] = profiled(lambda: ttft(engine, rand_ids(rng, prefill, vocab)), 1)
    base = rand_ids(rng, prefill, vocab)
    ttft(engine, base)
    ttft(engine, base[:cached] + rand_ids(rng, new, vocab))
    out[WORKLOADS[1]] = profiled(lambda: ttft(engine, base[:cached] + rand_ids(rng, new, vocab)), 1)
    for name, batch, prompt, steps in ((WORKLOADS[2], 1, b1_prompt, 16), (WORKLOADS[3], 32, b32_prompt, 8)):
        prepare, run = decode_steps(engine, rng, vocab, batch, prompt, steps)
        prepare()
        run()  # warm-up
        run_until_done(engine)
        prepare()
        out[name] = profiled(run, steps)
        run_until_done(engine)
    # The closures hold the engine: drop them too, or its KV pool stays allocated and the next
    # mode's engine finds no memory for one (the first device run: a 16-block pool).
    del prepare, run, engine
    free_memory()
    return out


def report(results: dict) -> str:
    lines = []
    for w in WORKLOADS:
        d, x = results["default"].get(w, {}), results["deterministic"].get(w, {})
        cats = defaultdict(lambda: [0.0, 0.0])
        for name, us in d.items():
            cats[category(name)][0] += us
        for name, us in x.items():
            cats[category(name)][1] += us
        total = [sum(v[0] for v in cats.values()), sum(v[1] for v in cats.values())]
        lines += [f"### {w}", "", "| kernels | default us | deterministic us | difference us |", "|---|---|---|---|"]
        for c, (a, b) in sorted(cats.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0])):
            lines.append(f"| {c} | {a:.0f} | {b:.0f} | {b - a:+.0f} |")
        lines.append(f"| **all GPU** | {total[0]:.0f} | {total[1]:.0f} | {total[1] - total[0]:+.0f} ({total[1] / max(total[0], 1e-9):.2f}x) |")
        for mode, times in (("default", d), ("deterministic", x)):
            top = sorted(times.items(), key=lambda kv: -kv[1])[:10]
            lines += ["", f"top kernels, {mode}: " + "; ".join(f"{n[:70]} {us:.0f} us" for n, us in top)]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--cpu-check", action="store_true", help="the embedded model on CPU, small sizes: the flow "
                        "and that each mode's engine is freed before the next is built (no GPU kernels to time)")  # fmt: skip
    args = parser.parse_args()
    global SIZES, ENGINE
    built: list = []
    if args.cpu_check:
        from radixserve.model.loader import load_model

        SIZES = (96, 64, 8, 32, 24)
        ENGINE = dict(source="embedded", dtype="float32", device="cpu", max_model_len=256)
        loaded = load_model(ModelConfig(**ENGINE, show_progress=False))
    else:
        loaded = dummy("llama3-8b", max_model_len=8192)
    results = {}
    for mode, det in (("default", False), ("deterministic", True)):
        results[mode] = profile_mode(loaded, det, built)
        free_memory() if torch.cuda.is_available() else None
        alive = [ref() is not None for ref in built]
        log(f"[profile] {mode} done; engines still alive: {sum(alive)}")
        if any(alive):
            raise RuntimeError("an engine outlived its mode: its KV pool would starve the next one")
    text = report(results)
    log(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "profile_deterministic.json").write_text(json.dumps(results, indent=1))
        Path(args.out, "profile_deterministic.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

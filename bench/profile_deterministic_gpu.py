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
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
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


def profile_mode(loaded, deterministic: bool) -> dict[str, dict[str, float]]:
    vocab = loaded.arch.vocab_size
    rng = random.Random(7)
    config = EngineConfig(
        model=ModelConfig(source="dummy:llama3-8b", dtype="bfloat16", device="cuda", max_model_len=8192, deterministic=deterministic),
        cache=CacheConfig(gpu_memory_utilization=0.85),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192),
    )
    engine = LLMEngine(config, loaded=loaded)
    out = {}
    ttft(engine, rand_ids(rng, 4096, vocab))  # warm-up
    out[WORKLOADS[0]] = profiled(lambda: ttft(engine, rand_ids(rng, 4096, vocab)), 1)
    base = rand_ids(rng, 4096, vocab)
    ttft(engine, base)
    ttft(engine, base[:4032] + rand_ids(rng, 64, vocab))
    out[WORKLOADS[1]] = profiled(lambda: ttft(engine, base[:4032] + rand_ids(rng, 64, vocab)), 1)
    for name, batch, prompt, steps in ((WORKLOADS[2], 1, 512, 16), (WORKLOADS[3], 32, 1024, 8)):
        prepare, run = decode_steps(engine, rng, vocab, batch, prompt, steps)
        prepare()
        run()  # warm-up
        run_until_done(engine)
        prepare()
        out[name] = profiled(run, steps)
        run_until_done(engine)
    del engine
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
    args = parser.parse_args()
    loaded = dummy("llama3-8b", max_model_len=8192)
    results = {}
    for mode, det in (("default", False), ("deterministic", True)):
        results[mode] = profile_mode(loaded, det)
        log(f"[profile] {mode} done")
    text = report(results)
    log(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "profile_deterministic.json").write_text(json.dumps(results, indent=1))
        Path(args.out, "profile_deterministic.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

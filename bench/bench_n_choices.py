"""n > 1 computes the prompt once: n choices in one request vs n separate requests, same run.

    .venv/bin/python bench/bench_n_choices.py [--prompt-tokens 2010] [--n 8] [--max-tokens 16] [--device cpu] [--write]

One engine per mode over the same loaded model; prefix caching off, so separate requests
really prefill separately (with caching on, eight identical prompts sent at once are deduped
by the shared-prefix wait; the n = 8 figure does not depend on the cache at all). For each:
prompt tokens the engine ran through the model (EngineStats.computed_prompt_tokens, exported as
radixserve_computed_prompt_tokens_total on /metrics), wall time, and KV blocks copied on write.
--write replaces the section `n-choices` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import update_section  # noqa: E402
from radixserve.benchmark.text import TextGenerator  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402


def run(loaded, args, prompt: list[int], shared: bool) -> dict:
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(source="embedded", device=args.device, show_progress=False),
        cache=CacheConfig(num_blocks=args.num_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.step_tokens),
    ), loaded=loaded)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=True)
    start = time.perf_counter()
    if shared:
        params.n = args.n
        engine.add_request(prompt, params)
    else:
        for i in range(args.n):
            engine.add_request(prompt, SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i,
                                                      ignore_eos=True))
    outputs = 0
    while engine.has_unfinished_requests():
        outputs += sum(o.finished for o in engine.step())
    seconds = time.perf_counter() - start
    assert outputs == args.n
    snap = engine.snapshot()
    assert snap.free_blocks == snap.total_blocks, "blocks leaked"
    return {"computed": snap.computed_prompt_tokens, "seconds": seconds,
            "generated": snap.generation_tokens, "copied": snap.copied_blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=2010, help="about; not a whole number of blocks")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-blocks", type=int, default=2048)
    parser.add_argument("--step-tokens", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(source="embedded", device=args.device, show_progress=False))
    prompt = loaded.tokenizer.encode(TextGenerator(random.Random(0)).text(args.prompt_tokens))
    separate = run(loaded, args, prompt, shared=False)
    shared = run(loaded, args, prompt, shared=True)
    rows = [
        ("prompt tokens run through the model", f"{separate['computed']}", f"{shared['computed']}"),
        ("tokens generated", f"{separate['generated']}", f"{shared['generated']}"),
        ("KV blocks copied on write", f"{separate['copied']}", f"{shared['copied']}"),
        ("wall time, add to last token", f"{separate['seconds']:.2f} s", f"{shared['seconds']:.2f} s"),
    ]
    lines = [f"| {args.prompt_tokens}-token prompt ({len(prompt)} tokens), {args.n} x {args.max_tokens} "
             f"tokens | {args.n} separate requests | one request, n = {args.n} |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    ratio = separate["seconds"] / shared["seconds"]
    body = "\n".join(lines) + (
        f"\n\nn = {args.n} prefills the prompt once ({shared['computed']} = the prompt's {len(prompt)} tokens); "
        f"the choices fork its block tables and copy only the partial last block ({shared['copied']} block copies "
        f"for {args.n} choices). {ratio:.2f}x faster "
        f"than {args.n} separate requests here, side by side in one run (prefix caching off in both, "
        f"so the separate requests really compute the prompt {args.n} times)."
    )
    print(body)
    assert shared["computed"] == len(prompt), "n > 1 must compute the prompt exactly once"
    if args.write:
        where = "GPU" if args.device.startswith("cuda") else "CPU"
        update_section(f"n-choices-{where.lower()}", f"{where}: n = {args.n} choices share one prefill", body)


if __name__ == "__main__":
    main()

"""Single-sequence prefill speed: radixserve's LlamaForCausalLM vs transformers', same weights.

Not a test (pytest does not collect it): run
    .venv/bin/python tests/model/bench_prefill_vs_hf.py [--preset smollm2-135m] [--tokens 512]
It times a full prefill (forward + last-token logits) on CPU in fp32, best and median of N runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from radixserve.model.arch import preset
    from radixserve.model.attention import AttentionMetadata, KVCache
    from radixserve.model.llama import LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours / transformers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    arch = preset(args.preset)
    cfg = arch.to_hf_config()
    cfg.pop("architectures"), cfg.pop("model_type")
    hf = HFLlama(LlamaConfig(**cfg)).eval()
    ours = LlamaForCausalLM(arch)
    ours.load_weights(hf.state_dict().items())

    T = args.tokens
    ids = torch.randint(0, arch.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
    block_size = 16
    nblocks = (T + block_size - 1) // block_size
    kv = KVCache.allocate(arch, nblocks, block_size, torch.float32, "cpu")
    meta = AttentionMetadata.build([list(range(nblocks))], [0], [T], block_size)

    def run_ours() -> torch.Tensor:
        h = ours(ids, meta, kv)
        return ours.compute_logits(h[-1:])

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf(ids[None], logits_to_keep=1, use_cache=False).logits[0].float()

    a, b = run_ours(), run_hf()
    err = ((a - b).norm() / b.norm()).item()

    def timeit(fn) -> tuple[list[float], list[float]]:
        fn()
        wall, cpu = [], []
        for _ in range(args.runs):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return wall, cpu

    # Interleave rounds so background load hits both alike. On a shared machine wall time is
    # noisy; with --threads 1, process CPU time is the robust measure of the work itself.
    res = {"radixserve": ([], []), "transformers": ([], [])}
    for _ in range(args.rounds):
        for name, fn in (("radixserve", run_ours), ("transformers", run_hf)):
            wall, cpu = timeit(fn)
            res[name][0].extend(wall)
            res[name][1].extend(cpu)
    print(f"preset={args.preset} tokens={T} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"runs={args.rounds}x{args.runs}")
    print(f"last-token logits rel err vs transformers: {err:.2e}")
    for name, (wall, cpu) in res.items():
        print(f"{name:>13}: wall best {min(wall) * 1e3:7.1f} ms median {statistics.median(wall) * 1e3:7.1f} ms | "
              f"cpu best {min(cpu) * 1e3:7.1f} ms median {statistics.median(cpu) * 1e3:7.1f} ms | "
              f"{T / min(wall):6.0f} tok/s (best wall)")
    (ow, oc), (hw, hc) = res["radixserve"], res["transformers"]
    print(f"speedup vs transformers: wall best {min(hw) / min(ow):.3f}x  wall median "
          f"{statistics.median(hw) / statistics.median(ow):.3f}x  cpu median "
          f"{statistics.median(hc) / statistics.median(oc):.3f}x")


if __name__ == "__main__":
    main()

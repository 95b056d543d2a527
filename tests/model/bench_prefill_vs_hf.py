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
    ap.add_argument("--runs", type=int, default=10)
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

    def timeit(fn) -> list[float]:
        fn()
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times

    # Interleave so thermal / background noise hits both alike.
    t_ours, t_hf = [], []
    for _ in range(2):
        t_ours += timeit(run_ours)
        t_hf += timeit(run_hf)
    print(f"preset={args.preset} tokens={T} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"last-token logits rel err vs transformers: {err:.2e}")
    for name, ts in (("radixserve", t_ours), ("transformers", t_hf)):
        print(f"{name:>13}: best {min(ts) * 1e3:7.1f} ms  median {statistics.median(ts) * 1e3:7.1f} ms  "
              f"({T / statistics.median(ts):7.0f} tok/s)")
    print(f"speedup (median): {statistics.median(t_hf) / statistics.median(t_ours):.2f}x")


if __name__ == "__main__":
    main()

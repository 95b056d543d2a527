"""--deterministic on CPU with the embedded model: a request's logits are bitwise the same however
it runs: (a) with none or part of its prompt from the prefix cache (several block boundaries),
(b) alone or in a batch with other requests' prefills and decodes, (c) under any prefill chunk
size, (d) preempted and recomputed; and seeded sampling gives the same tokens. The default mode
is untouched by the switch. (The GPU version of the matrix: test_deterministic_gpu.py.)
"""

from __future__ import annotations

import pytest
import torch

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.engine import LLMEngine
from radixserve.sampling import SamplingParams

N_TOKENS = 3
TEXT = "You are a meticulous assistant for a travel agency. Answer briefly and cite the country of each place. "


def make(loaded, *, deterministic=True, caching=False, chunk=2048, num_blocks=128, block_size=8) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(source="embedded", show_progress=False, deterministic=deterministic),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=chunk, new_prompt_budget_fraction=0.0),
    )
    engine = LLMEngine(config, loaded=loaded)
    engine.logits = {}
    postprocess = engine._postprocess

    def capture(scheduled, sampling, logits, pending_masks):  # the logits the sampler sees, per request
        for i, r in enumerate(sampling):
            engine.logits.setdefault(r.request_id, []).append(logits[i].clone())
        return postprocess(scheduled, sampling, logits, pending_masks)

    engine._postprocess = capture
    return engine


def finish(engine) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def greedy(n: int = N_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(embedded_model):
    tok = embedded_model.tokenizer
    target = tok.encode(TEXT * 3)[:44]
    others = [tok.encode(f"Write {i + 1} short lines about the sea. ") * (i + 1) for i in range(3)]
    return target, others


def _ways(loaded, target, others) -> dict[str, tuple[list[torch.Tensor], list[int], object]]:
    """(logits per sampled position, tokens, engine) of `target` run each way of the matrix."""
    ways = {}
    e = make(loaded)
    e.add_request(target, greedy(), request_id="t")
    ways["alone"] = e
    for cached in (8, 24, 40):  # (a) cache hits ending at different block boundaries
        e = make(loaded, caching=True)
        e.add_request(target[:cached] + [7] * 3, greedy(1), request_id="warm")
        finish(e)
        e.add_request(target, greedy(), request_id="t")
        ways[f"{cached} tokens cached"] = e
    e = make(loaded)  # (b) in a batch: others' prefills first, then decodes beside ours
    for i, o in enumerate(others):
        e.add_request(o, greedy(4), request_id=f"o{i}")
    e.step()
    e.add_request(target, greedy(), request_id="t")
    e.add_request(others[0][:5], greedy(2), request_id="late")
    ways["batched"] = e
    ways["chunks of 12"] = make(loaded, chunk=12)  # (c)
    ways["chunks of 12"].add_request(target, greedy(), request_id="t")
    # (d) preempted and recomputed: the three prompts fill the 24-block pool exactly (10 + 3 + 11
    # blocks of 4 tokens), so the first decode step needs a block and the newest request, ours,
    # is preempted; it is recomputed once the others finish.
    e = make(loaded, num_blocks=24, block_size=4)
    e.add_request(others[1] + others[1], greedy(3), request_id="o0")  # 40 tokens
    e.add_request(others[0], greedy(3), request_id="o1")  # 10 tokens
    e.target_request = e.add_request(target, greedy(), request_id="t")  # 44 tokens
    ways["preempted"] = e
    results = {}
    for name, e in ways.items():
        outs = finish(e)
        results[name] = (e.logits["t"], outs["t"].token_ids, e)
    return results


@pytest.mark.slow
def test_logits_bitwise_equal_across_cache_batch_chunks_preemption(embedded_model, prompts):
    target, others = prompts
    results = _ways(embedded_model, target, others)
    ref_logits, ref_tokens, _ = results.pop("alone")
    assert len(ref_logits) == N_TOKENS
    assert results["preempted"][2].target_request.num_preemptions > 0
    for cached in (8, 24, 40):
        assert results[f"{cached} tokens cached"][2].cache.stats.hit_tokens >= cached
    for name, (logits, tokens, _) in results.items():
        assert tokens == ref_tokens, name
        for pos, (a, b) in enumerate(zip(logits, ref_logits)):
            assert torch.equal(a, b), f"{name}: logits at position {pos} differ by {(a - b).abs().max().item():.3g}"


def test_seeded_sampling_same_tokens_alone_and_batched(embedded_model, prompts):
    target, others = prompts
    params = SamplingParams(max_tokens=4, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = make(embedded_model)
    alone.add_request(target, params, request_id="t")
    batched = make(embedded_model, caching=True)
    batched.add_request(target[:16] + [5], greedy(1), request_id="warm")
    finish(batched)
    for i, o in enumerate(others):
        batched.add_request(o, SamplingParams(max_tokens=5, temperature=1.0, seed=i), request_id=f"o{i}")
    batched.add_request(target, params, request_id="t")
    assert finish(alone)["t"].token_ids == finish(batched)["t"].token_ids
    assert all(torch.equal(a, b) for a, b in zip(alone.logits["t"], batched.logits["t"]))


def test_default_mode_unchanged_by_the_switch(embedded_model, prompts):
    """An engine in the default mode computes exactly what it did before a deterministic engine
    ran on the same loaded model (plain F.linear, the SDPA attention paths)."""
    target, _ = prompts
    before = make(embedded_model, deterministic=False)
    before.add_request(target, greedy(), request_id="t")
    finish(before)
    det = make(embedded_model, deterministic=True)
    det.add_request(target, greedy(), request_id="t")
    finish(det)
    after = make(embedded_model, deterministic=False)
    after.add_request(target, greedy(), request_id="t")
    finish(after)
    assert all(torch.equal(a, b) for a, b in zip(before.logits["t"], after.logits["t"]))
    model = embedded_model.model
    assert model.invariant_linear is None and not model.backend.deterministic
    assert all(getattr(m, "invariant_linear", None) is None for m in model.modules())

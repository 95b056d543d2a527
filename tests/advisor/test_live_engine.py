"""Acceptance: the advisor's predicted hit rates match what a live LLMEngine reports for the same
requests, on the generated logs (shared 2000-token system prompt; the same with a request id in
front; four system prompts interleaved under a cache that holds two).

The engine runs the requests one after another (the advisor's replay model) with max_tokens=1, so
the cache holds prompts only. Cache behaviour does not depend on the weights, so the default test
runs the real engine (scheduler, cache manager, runner, model forward) on the `dummy:tiny` preset,
which shares the embedded model's vocabulary and is fast on CPU; the slow test repeats it with the
embedded SmolLM2 weights on shorter logs.
"""

from __future__ import annotations

import pytest

from radixserve.advisor import AdvisorConfig, analyze, model_info_from_loaded, read_log
from radixserve.advisor.replay import blocks_to_hold
from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.sampling import SamplingParams
from tests.advisor import generated_logs

BLOCK = 16
# The interleaved log's prompts are ~424 tokens = 27 blocks: 80 blocks hold two of them besides
# the request being prefilled, so four system prompts in turn keep evicting each other.
INTERLEAVED_CAPACITY_BLOCKS = 80


@pytest.fixture(scope="module")
def tiny_model():
    from radixserve.model.loader import load_model

    return load_model(ModelConfig(source="dummy:tiny", show_progress=False))


def run_live(loaded, token_lists: list[list[int]], num_blocks: int) -> tuple[float, list[int]]:
    """(engine hit rate, cached tokens per request) with requests run one at a time."""
    from radixserve.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(show_progress=False),
            cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
            scheduler=SchedulerConfig(),
        ),
        loaded=loaded,
    )
    cached = []
    for i, ids in enumerate(token_lists):
        engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0), request_id=f"r{i}")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    cached.append(out.num_cached_tokens)
    snap = engine.snapshot()
    return snap.prefix_cache_hits / snap.prefix_cache_queries, cached


def predict_and_compare(loaded, records, tmp_path, capacity_blocks: int | None):
    path = generated_logs.write_jsonl(records, tmp_path / "log.jsonl")
    model = model_info_from_loaded(loaded)
    log = read_log(path, model.tokenizer, vocab_size=model.arch.vocab_size)
    blocks = capacity_blocks or blocks_to_hold(log.requests, BLOCK)
    report = analyze(log.requests, model, AdvisorConfig(block_size=BLOCK, capacity_tokens=blocks * BLOCK), log=log)
    live_rate, live_cached = run_live(loaded, [r.token_ids for r in log.requests], blocks)
    return report, live_rate, live_cached


def _check(report, live_rate, live_cached):
    predicted = report.hit_rate
    assert abs(predicted - live_rate) <= 0.02, (predicted, live_rate)
    # Stronger than the acceptance bound: the replay drives the engine's own cache manager.
    assert report.result.cached_tokens == live_cached


def test_shared_system_prompt_matches_engine(tiny_model, shared_system_records, tmp_path):
    report, live_rate, live_cached = predict_and_compare(tiny_model, shared_system_records, tmp_path, None)
    _check(report, live_rate, live_cached)
    n = len(report.requests)
    assert report.hit_rate > 0.8  # everything but the first system prompt and the questions
    assert live_cached == [0] + [2000] * (n - 1)
    assert not [f for f in report.findings if f.severity == "high"]


def test_request_id_in_front_matches_engine_and_is_flagged(tiny_model, request_id_records, tokenizer, tmp_path):
    report, live_rate, live_cached = predict_and_compare(tiny_model, request_id_records, tmp_path, None)
    _check(report, live_rate, live_cached)
    assert report.hit_rate < 0.01
    [finding] = [f for f in report.findings if f.kind == "early_divergence"]
    first, second = (r.token_ids for r in report.requests[:2])
    divergence = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert finding.data["divergence_token"] == divergence
    assert tokenizer.decode(first[:divergence]).endswith("Request id: ")
    assert "Request id: " in finding.fix and "after the shared content" in finding.fix
    assert finding.data["shared_tokens"] >= 1990
    assert finding.requests == len(report.requests)
    assert finding.data["hit_rate_after_fix"] > 0.8


def test_interleaved_system_prompts_under_small_capacity_match_engine(tiny_model, interleaved_records, tmp_path):
    report, live_rate, live_cached = predict_and_compare(
        tiny_model, interleaved_records, tmp_path, INTERLEAVED_CAPACITY_BLOCKS
    )
    _check(report, live_rate, live_cached)
    assert report.unbounded.hit_rate > report.hit_rate + 0.2
    [churn] = [f for f in report.findings if f.kind == "churn"]
    assert churn.data["suggested_capacity_tokens"] > INTERLEAVED_CAPACITY_BLOCKS * BLOCK
    assert report.curve.knee_tokens == churn.data["suggested_capacity_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shared", "request_id", "interleaved"])
def test_embedded_model_matches_engine(embedded_model, tokenizer, tmp_path, kind):
    """The same check with SmolLM2's real weights, on logs short enough for a CPU."""
    if kind == "shared":
        records, capacity = generated_logs.shared_system_log(tokenizer, num_requests=4, system_tokens=500), None
    elif kind == "request_id":
        records, capacity = generated_logs.request_id_log(tokenizer, num_requests=3, system_tokens=500), None
    else:
        records, capacity = generated_logs.interleaved_log(tokenizer, num_requests=8, system_tokens=200), 40
    report, live_rate, live_cached = predict_and_compare(embedded_model, records, tmp_path, capacity)
    _check(report, live_rate, live_cached)


def test_prefill_rate_is_measured_on_the_engine(tiny_model):
    from radixserve.advisor.prefill_rate import measure_prefill_rate

    assert measure_prefill_rate(tiny_model, num_tokens=64, repeats=1) > 0

"""Issue #12, engine side: one request's failure stays its own, pins can neither starve the pool
nor stall a request, and a long prefill leaves room for others in every step."""

from __future__ import annotations

from radixserve.request import CachePin
from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion


def _all_blocks_back(engine) -> bool:
    snap = engine.snapshot()
    return snap.free_blocks + snap.cached_blocks == snap.total_blocks


def test_a_request_whose_sampling_fails_fails_alone(make_engine):
    engine = make_engine(num_blocks=128)
    good = [engine.add_request(f"Count to {n}:", SamplingParams(max_tokens=6, temperature=0.8, seed=n)).request_id
            for n in range(3)]
    bad_request = engine.add_request("Count to 9:", SamplingParams(max_tokens=6, temperature=0.8, seed=1))
    bad_request.sampling.seed = 2**70  # past every check, as a bug could let through: the sampler raises
    bad = bad_request.request_id
    finished = run_to_completion(engine)
    assert finished[bad].finish_reason == "error" and finished[bad].error
    for rid in good:
        assert finished[rid].finish_reason in ("stop", "length") and finished[rid].token_ids
    assert _all_blocks_back(engine)
    assert engine.stats.finished_requests == 4


def _pin_prompt(engine, num_tokens: int, ttl: float = 3600.0, namespace: str = "", alive=None):
    """Prefill `num_tokens` tokens with a pin on all of them; returns the tokens the tree pinned."""
    ids = [(i * 7919) % 20000 + 100 for i in range(num_tokens)]
    req = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0), cache_namespace=namespace,
                             cache_pins=[CachePin(num_tokens, ttl, alive=alive)])
    out = run_to_completion(engine)[req.request_id]
    return out.num_pinned_tokens


def test_pins_are_bounded_per_namespace_and_in_total(make_engine):
    engine = make_engine(num_blocks=16)  # defaults: 50% in total (8 blocks), 25% per namespace (4)
    assert _pin_prompt(engine, 5 * 16) == 0  # 5 blocks > 4: refused
    assert engine.pinned_blocks() == 0
    assert _pin_prompt(engine, 4 * 16, namespace="a") == 64
    assert _pin_prompt(engine, 3 * 16, namespace="b") == 48
    assert _pin_prompt(engine, 2 * 16, namespace="c") == 0  # 4 + 3 + 2 > 8 in total
    assert engine.pinned_blocks() == 7
    assert _all_blocks_back(engine)


def test_a_request_that_only_fits_without_the_pins_runs_anyway(embedded_model):
    # the case, scaled down: a pin holds most of the pool, the next prompt needs more
    from radixserve.config import CacheConfig, EngineConfig, ModelConfig
    from radixserve.engine import LLMEngine

    cache = CacheConfig(num_blocks=16, max_pinned_fraction=1.0, max_pinned_fraction_per_namespace=1.0)  # pins unbounded
    engine = LLMEngine(EngineConfig(model=ModelConfig(source="embedded", show_progress=False), cache=cache),
                       loaded=embedded_model)
    assert _pin_prompt(engine, 12 * 16) == 192
    req = engine.add_request([5] * 120, SamplingParams(max_tokens=4, temperature=0))  # 8 blocks > 4 unpinned
    finished = run_to_completion(engine, max_steps=200)
    assert finished[req.request_id].finish_reason == "length"
    assert engine.pinned_blocks() == 0  # the pin yielded
    assert _all_blocks_back(engine)


def test_a_pin_whose_owner_is_gone_is_not_applied(make_engine):
    engine = make_engine(num_blocks=128)
    assert _pin_prompt(engine, 64, alive=lambda: False) == 0
    assert engine.pinned_blocks() == 0
    assert _pin_prompt(engine, 64, alive=lambda: True) == 64


def test_a_short_request_is_not_stuck_behind_a_long_prefill(make_engine):
    engine = make_engine(num_blocks=128, max_num_batched_tokens=128)
    long = engine.add_request([7] * 700, SamplingParams(max_tokens=2, temperature=0))
    engine.step()  # the long prefill is under way: 572 tokens to go, 5 more steps alone
    short = engine.add_request([9] * 5, SamplingParams(max_tokens=1, temperature=0))
    first_tokens = {}
    for step in range(1, 20):
        for out in engine.step():
            first_tokens.setdefault(out.request_id, step)
        if short.request_id in first_tokens:
            break
    assert first_tokens[short.request_id] == 1  # admitted into the very next step
    assert long.request_id not in first_tokens  # which the long prefill still shared
    run_to_completion(engine)
    assert _all_blocks_back(engine)

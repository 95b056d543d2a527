"""n > 1: the choices of one request share its prompt's KV (one prefill, forked block tables,
the partial last block copied on write), sample independently, and give every block back."""

from __future__ import annotations

import pytest

from radixserve.request import choice_request_ids
from radixserve.sampling import SamplingParams, choice_seed
from tests.conftest import run_to_completion

# not a whole number of 16-token blocks: the choices share a partial block, then copy it on write
PROMPT = "In 1492, Columbus sailed across the Atlantic Ocean. He was looking for a western route to Asia, but he"


def _all_blocks_back(engine) -> None:
    engine.check_cache_invariants()
    snap = engine.snapshot()
    assert snap.free_blocks + snap.cached_blocks == snap.total_blocks
    if not engine.prefix_caching:
        assert snap.free_blocks == snap.total_blocks


@pytest.mark.slow
@pytest.mark.parametrize("caching", [True, False])
def test_n4_greedy_computes_the_prompt_once(make_engine, caching):
    """Four choices, one prefill: the prompt-token counter moves by the prompt's length once."""
    engine = make_engine(enable_prefix_caching=caching)
    num_prompt = len(engine.tokenizer.encode(PROMPT))
    assert num_prompt % engine.block_size != 0, "the test needs a shared partial block"
    engine.add_request(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), request_id="one")
    single = run_to_completion(engine)["one"]
    computed_before = engine.stats.computed_prompt_tokens

    fresh = make_engine(enable_prefix_caching=caching)  # nothing cached: the prefill is real
    fresh.add_request(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, n=4), request_id="four")
    outs = run_to_completion(fresh)
    ids = choice_request_ids("four", 4)
    assert sorted(outs) == sorted(ids)
    assert [outs[rid].index for rid in ids] == [0, 1, 2, 3]
    for rid in ids:
        assert outs[rid].token_ids == single.token_ids  # temperature 0: every choice is the same text
        assert outs[rid].finish_reason == "length"
    assert fresh.stats.computed_prompt_tokens == num_prompt == computed_before  # one prefill for four choices
    assert fresh.stats.prompt_tokens == num_prompt
    assert fresh.cache.stats.forks == 3
    assert fresh.cache.stats.copied_blocks == 3  # three of the four copy the shared partial block
    _all_blocks_back(fresh)


@pytest.mark.slow
@pytest.mark.parametrize("caching, policy", [(True, "read_write"), (True, "none"), (False, "read_write")])
def test_seeded_choices_match_their_own_solo_runs(make_engine, caching, policy):
    """Each choice samples with its own derived seed; if one choice's writes reached another's
    K/V (no copy on write), its continuation would differ from the same seed run alone."""
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    solo = make_engine(enable_prefix_caching=False)
    expected = []
    for i in range(3):
        solo.add_request(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=choice_seed(7, i), ignore_eos=True),
                         request_id=f"s{i}")
        expected.append(run_to_completion(solo)[f"s{i}"].token_ids)
    assert len({tuple(e) for e in expected}) == 3, "distinct seeds should give distinct samples here"

    engine = make_engine(enable_prefix_caching=caching)
    params.n = 3
    engine.add_request(PROMPT, params, request_id="r", cache_policy=policy)
    outs = run_to_completion(engine)
    assert [outs[rid].token_ids for rid in choice_request_ids("r", 3)] == expected
    _all_blocks_back(engine)
    if policy != "read_write":
        assert engine.snapshot().free_blocks == engine.num_kv_blocks  # it stored nothing


def test_abort_before_and_during_decoding(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, n=3, ignore_eos=True)
    engine.add_request(PROMPT, params, request_id="a")
    aborted = engine.abort_request("a")  # before its prefill: choice 1 prefills instead
    assert aborted.finish_reason == "abort" and aborted.index == 0
    outs = run_to_completion(engine)
    assert sorted(outs) == ["a/1", "a/2"] and all(len(o.token_ids) == 6 for o in outs.values())
    assert engine.stats.computed_prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    _all_blocks_back(engine)

    engine.add_request(PROMPT + " and", SamplingParams(max_tokens=50, temperature=0.8, n=4, ignore_eos=True),
                       request_id="b")
    for _ in range(2):
        engine.step()
    assert engine.snapshot().running == 4  # all four choices decode side by side
    for rid in choice_request_ids("b", 4):
        assert engine.abort_request(rid).finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    _all_blocks_back(engine)


def test_choices_preempted_under_memory_pressure_recompute(make_engine):
    """A pool too small for all choices at once: the newest are preempted and recomputed, and
    greedy output does not change."""
    reference = make_engine(num_blocks=64, enable_prefix_caching=False)
    reference.add_request(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), request_id="x")
    expected = run_to_completion(reference)["x"].token_ids
    engine = make_engine(num_blocks=6, enable_prefix_caching=False)
    engine.add_request(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, n=3), request_id="x")
    outs = run_to_completion(engine)
    assert engine.stats.preemptions > 0
    assert all(o.token_ids == expected for o in outs.values())
    _all_blocks_back(engine)


def test_n_out_of_range_is_refused(make_engine):
    from radixserve.errors import InvalidRequestError

    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="n must be between 1 and 16"):
        engine.add_request(PROMPT, SamplingParams(n=17))

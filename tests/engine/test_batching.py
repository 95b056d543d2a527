"""Continuous batching, chunked prefill and preemption must not change what is generated."""

from __future__ import annotations

from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion

PROMPTS = [
    "The quick brown fox",
    "Write a short poem about the sea. The sea is wide and deep and",
    "List three prime numbers: 2, 3,",
    "In 1492, Columbus sailed across the Atlantic Ocean. He was looking for a western route to Asia, but instead he",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of",
]


def _greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_batched_chunked_preempted_equals_one_at_a_time(make_engine):
    solo = make_engine(num_blocks=64, enable_prefix_caching=False)
    expected = {}
    for i, prompt in enumerate(PROMPTS):
        solo.add_request(prompt, _greedy(), request_id=str(i))
        expected.update(run_to_completion(solo))

    # a tiny token budget forces chunked prefill; 12 blocks of 16 tokens cannot hold all six
    # requests at once, so the scheduler must preempt and recompute
    batched = make_engine(num_blocks=12, enable_prefix_caching=False, max_num_batched_tokens=16)
    for i, prompt in enumerate(PROMPTS):
        batched.add_request(prompt, _greedy(), request_id=str(i))
    got = run_to_completion(batched)

    assert batched.stats.preemptions > 0
    for i in range(len(PROMPTS)):
        assert got[str(i)].token_ids == expected[str(i)].token_ids, PROMPTS[i]
        assert len(got[str(i)].token_ids) == 24
        assert got[str(i)].finish_reason == "length"
    assert batched.snapshot().free_blocks == batched.num_kv_blocks


def test_seeded_sampling_is_reproducible_within_a_batch(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    engine.add_request(PROMPTS[0], params, request_id="alone")
    alone = run_to_completion(engine)["alone"]
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=i), request_id=f"noise{i}")
    engine.add_request(PROMPTS[0], params, request_id="batched")
    batched = run_to_completion(engine)["batched"]
    assert batched.token_ids == alone.token_ids


def test_stop_strings_and_stop_tokens(make_engine):
    engine = make_engine()
    prompt = "Count: 1, 2, 3, 4, 5, 6, 7, 8,"
    engine.add_request(prompt, _greedy(40), request_id="free")
    free = run_to_completion(engine)["free"]
    assert len(free.text) > 6
    stop = free.text[3:6]
    engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]), request_id="s")
    out = run_to_completion(engine)["s"]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.find(stop)]

    third = free.token_ids[2]
    engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[third]), request_id="t")
    out = run_to_completion(engine)["t"]
    assert out.finish_reason == "stop" and out.stop_reason == third
    assert out.token_ids == free.token_ids[:3]


def test_streaming_deltas_concatenate_to_the_final_text(make_engine):
    engine = make_engine()
    engine.add_request("Once upon a time", _greedy(30), request_id="x")
    pieces, tokens, final = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            tokens.extend(out.new_token_ids)
            if out.finished:
                final = out
            else:  # streamed outputs carry only the delta
                assert out.token_ids == [] and out.text == ""
    assert final is not None and "".join(pieces) == final.text and tokens == final.token_ids
    assert final.metrics.time_to_first_token is not None and final.metrics.time_to_first_token > 0


def test_abort_frees_everything(make_engine):
    engine = make_engine(num_blocks=64, max_num_batched_tokens=16)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, _greedy(50), request_id=str(i))
    for _ in range(6):
        engine.step()
    for i in range(len(PROMPTS)):
        engine.abort_request(str(i))
    assert not engine.has_unfinished_requests()
    snap = engine.snapshot()
    assert snap.free_blocks + snap.cached_blocks == snap.total_blocks
    engine.reset_prefix_cache()
    assert engine.snapshot().free_blocks == snap.total_blocks

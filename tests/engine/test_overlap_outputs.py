"""SchedulerConfig.overlap_outputs: a step's outputs are built during the next step (while the GPU
runs it); tokens, text, finish reasons and the streamed deltas are the same as without it."""

from __future__ import annotations

import pytest

from radixserve.sampling import SamplingParams

PROMPTS = [
    ("The capital of France is", SamplingParams(max_tokens=12, temperature=0)),
    ("Once upon a time", SamplingParams(max_tokens=12, temperature=0, stop=[" the", "."])),
    ("List three colors:", SamplingParams(max_tokens=16, temperature=0.8, seed=7)),
    ("def fibonacci(n):", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
    ("Write a haiku about rain", SamplingParams(max_tokens=8, temperature=0.9, seed=3, n=2)),
    ("Tell me a long story about a dragon", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)),
]
ABORTED = "r5"  # the long story, aborted after ABORT_AFTER steps
ABORT_AFTER = 4


def run(make_engine, overlap: bool) -> tuple[dict, dict, list[int]]:
    """(final output per request, streamed (token ids, text) per request, outputs per step call)."""
    engine = make_engine()
    engine.config.scheduler.overlap_outputs = overlap
    for i, (prompt, params) in enumerate(PROMPTS):
        engine.add_request(prompt, params, request_id=f"r{i}")
    finals, streamed, per_call = {}, {}, []
    calls = 0

    def take(out):
        ids, text = streamed.get(out.request_id, ([], ""))
        streamed[out.request_id] = (ids + out.new_token_ids, text + out.new_text)
        if out.finished:
            assert out.request_id not in finals, "a request finished twice"
            finals[out.request_id] = out

    while engine.has_unfinished_requests():
        outputs = engine.step()
        per_call.append(len(outputs))
        for out in outputs:
            assert out.request_id not in finals, "an output after the final one"
            take(out)
        calls += 1
        if calls == ABORT_AFTER:
            aborted = engine.abort_request(ABORTED)
            assert aborted is not None and aborted.finished
            take(aborted)
        assert calls < 500
    engine.check_cache_invariants()
    return finals, streamed, per_call


@pytest.mark.slow
def test_overlapped_outputs_are_the_same_tokens_text_and_deltas(make_engine):
    plain, plain_stream, plain_calls = run(make_engine, overlap=False)
    overlapped, overlapped_stream, overlapped_calls = run(make_engine, overlap=True)
    assert sorted(plain) == sorted(overlapped) and len(plain) == len(PROMPTS) + 1  # n=2: two choices
    for rid, out in plain.items():
        other = overlapped[rid]
        assert (other.token_ids, other.text, other.finish_reason, other.stop_reason) == (
            out.token_ids, out.text, out.finish_reason, out.stop_reason), rid
        # streamed deltas add up to the whole, in both modes
        assert plain_stream[rid] == (out.token_ids, out.text), rid
        assert overlapped_stream[rid] == (out.token_ids, out.text), rid
    assert plain[ABORTED].finish_reason == "abort" and 0 < len(plain[ABORTED].token_ids) < 16
    assert plain["r1"].finish_reason == "stop" and isinstance(plain["r1"].stop_reason, str)
    # the overlap really defers: the first step (prefills, first tokens) hands out nothing yet,
    # and one more call than without it hands out the last outputs
    assert plain_calls[0] > 0 and overlapped_calls[0] == 0
    assert len(overlapped_calls) == len(plain_calls) + 1


def run_failing(make_engine, overlap: bool) -> dict:
    """Three greedy requests, run to the end."""
    engine = make_engine()
    engine.config.scheduler.overlap_outputs = overlap
    for i, (prompt, _) in enumerate(PROMPTS[:3]):
        engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), request_id=f"r{i}")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    engine.check_cache_invariants()
    return finals


@pytest.mark.slow
def test_a_request_failing_in_its_deferred_output_fails_alone(make_engine, embedded_model, monkeypatch):
    reference = run_failing(make_engine, overlap=False)
    bad_token = reference["r0"].token_ids[2]
    tokenizer_class = type(embedded_model.tokenizer)
    decode = tokenizer_class.decode

    def failing_decode(self, ids, *args, **kwargs):
        if bad_token in list(ids):
            raise ValueError("cannot render this token")
        return decode(self, ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "decode", failing_decode)
    plain = run_failing(make_engine, overlap=False)
    overlapped = run_failing(make_engine, overlap=True)
    assert plain["r0"].finish_reason == "error" and plain["r0"].token_ids == reference["r0"].token_ids[:3]
    for rid, out in plain.items():  # the same requests fail, at the same token; the others finish
        other = overlapped[rid]
        assert (other.finish_reason, other.token_ids) == (out.finish_reason, out.token_ids), rid

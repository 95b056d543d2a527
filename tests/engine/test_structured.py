"""Grammar-constrained decoding in the engine: masked rows obey the grammar, unmasked rows in the
same batch are untouched, a grammar that cannot finish ends at max_tokens, logprobs."""

from __future__ import annotations

import json
import math

import jsonschema
import torch

from radixserve.sampling import Sampler, SamplingParams
from radixserve.structured import GuidedSpec, apply_bitmask
from tests.conftest import run_to_completion

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPT = "<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n"


def test_guided_and_free_requests_share_a_batch(make_engine):
    free = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    solo = make_engine()
    solo.add_request(PROMPT, free, request_id="free")
    expected = run_to_completion(solo)["free"]

    engine = make_engine()
    engine.add_request(PROMPT, free, request_id="free")
    engine.add_request(PROMPT, SamplingParams(max_tokens=40, temperature=0.0, guided=GuidedSpec("json_schema", SCHEMA)),
                       request_id="json")
    engine.add_request(PROMPT, SamplingParams(max_tokens=40, temperature=0.8, seed=3,
                                              guided=GuidedSpec("json_object")), request_id="object")
    got = run_to_completion(engine)
    assert got["free"].token_ids == expected.token_ids  # the unguided row is bit-for-bit what it was alone
    jsonschema.validate(json.loads(got["json"].text), SCHEMA)
    assert got["json"].finish_reason == "stop"
    assert isinstance(json.loads(got["object"].text), dict)


def test_a_grammar_that_cannot_finish_stops_at_max_tokens(make_engine):
    engine = make_engine()
    engine.add_request(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, guided=GuidedSpec("json_schema", SCHEMA)),
                       request_id="short")
    out = run_to_completion(engine)["short"]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith("{")  # the partial output
    assert not engine.has_unfinished_requests()


def test_bitmask_masks_only_disallowed_tokens():
    logits = torch.zeros(2, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5
    bitmask[1, 2] = 1 << 3  # token 67
    masked = apply_bitmask(logits, bitmask)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [5]
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [67]


def test_sampler_masks_only_the_named_rows():
    logits = torch.randn(3, 64)
    before = logits.clone()
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 1] = 1 << 4  # only token 36
    params = [SamplingParams(temperature=0.0) for _ in range(3)]
    tokens = Sampler().sample(logits, params, ["a", "b", "c"], masks=([1], bitmask))
    assert tokens[1] == 36
    assert tokens[0] == int(before[0].argmax()) and tokens[2] == int(before[2].argmax())
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])


def test_logprobs(make_engine):
    engine = make_engine()
    engine.add_request(PROMPT, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3),
                       request_id="lp")
    out = run_to_completion(engine)["lp"]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy: the sampled token is the top one
        assert math.isclose(lp.top[0][1], lp.logprob, abs_tol=1e-5)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]

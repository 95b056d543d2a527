"""Automatic prefix caching through the engine: exact reuse counts, identical outputs, no leaks."""

from __future__ import annotations

import pytest

from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion

SYSTEM = (
    "You are a meticulous assistant for a travel agency. Answer briefly, cite the destination's "
    "country, and never invent prices. Our offices are in Lisbon, Oslo and Kyoto. "
) * 3
FEW_SHOT = (
    "Classify the sentiment.\nReview: I loved it. -> positive\nReview: Terrible service. -> negative\n"
    "Review: It was fine, nothing special. -> neutral\nReview: Best trip ever! -> positive\n"
)


def _greedy(n: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _expected_cached(n: int, k: int, block_size: int) -> int:
    return block_size * (min(k, n - 1) // block_size)


@pytest.mark.parametrize("block_size", [16, 1])
def test_exact_cached_token_counts(make_engine, embedded_model, block_size):
    engine = make_engine(block_size=block_size, num_blocks=4096 // block_size)
    base = embedded_model.tokenizer.encode(SYSTEM)[:100]
    assert len(base) == 100
    # max_tokens=1: exactly the prompt's tokens get computed (the sampled token has no KV yet)
    engine.add_request(base, SamplingParams(max_tokens=1, temperature=0), request_id="seed")
    seed = run_to_completion(engine)["seed"]
    assert seed.num_cached_tokens == 0

    other = [7] * 100
    cases = {
        "diverge-inside-block": base[:37] + other[:20],  # k = 37
        "diverge-at-boundary": base[:48] + other[:30],  # k = 48
        "identical-repeat": list(base),  # k = n = 100
        "strict-prefix": base[:40],  # k = n = 40
        "block-multiple-repeat": base[:96],  # k = n = 96: the last block is recomputed
        "first-token-differs": other[:1] + base[1:50],  # k = 0
    }
    for name, prompt in cases.items():
        k = 0
        while k < min(len(prompt), len(base)) and prompt[k] == base[k]:
            k += 1
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0), request_id=name)
        out = run_to_completion(engine)[name]
        assert out.num_cached_tokens == _expected_cached(len(prompt), k, block_size), name
        engine.reset_prefix_cache()
        engine.add_request(base, SamplingParams(max_tokens=1, temperature=0), request_id=f"reseed-{name}")
        run_to_completion(engine)


def _workload(tokenizer) -> list[tuple[str, list[int], int]]:
    """(namespace, prompt ids, max_tokens): shared system prompts, few-shot, chats, divergent prompts."""
    items = []
    chat = [{"role": "system", "content": SYSTEM}]
    for question in ["Where is Kyoto?", "Is Oslo cold in winter?", "What is Lisbon famous for?"]:
        items.append(("", tokenizer.encode(tokenizer.apply_chat_template(chat + [{"role": "user", "content": question}])), 12))
    for review in ["Loved the food.", "The hotel was dirty.", "Okay I guess."]:
        items.append(("", tokenizer.encode(FEW_SHOT + f"Review: {review} ->"), 4))
    turns = [{"role": "user", "content": "Name a fruit."}]
    for reply, follow in [("Apple.", "Another one?"), ("Banana.", "And a vegetable?")]:
        items.append(("", tokenizer.encode(tokenizer.apply_chat_template(turns)), 8))
        turns = turns + [{"role": "assistant", "content": reply}, {"role": "user", "content": follow}]
    items.append(("", tokenizer.encode(tokenizer.apply_chat_template(turns)), 8))
    items.append(("", tokenizer.encode("A completely different prompt about volcanoes and lava."), 10))
    items.append(("tenant-b", tokenizer.encode(FEW_SHOT + "Review: Loved the food. ->"), 4))
    return items


def _run_workload(engine, items, concurrent: bool) -> dict[str, list[int]]:
    outputs = {}
    if concurrent:
        for i, (ns, prompt, n) in enumerate(items):
            engine.add_request(prompt, _greedy(n), request_id=str(i), cache_namespace=ns)
        outputs = {k: v.token_ids for k, v in run_to_completion(engine).items()}
    else:
        for i, (ns, prompt, n) in enumerate(items):
            engine.add_request(prompt, _greedy(n), request_id=str(i), cache_namespace=ns)
            outputs.update({k: v.token_ids for k, v in run_to_completion(engine).items()})
    return outputs


@pytest.mark.slow
def test_outputs_identical_with_cache_on_and_off(make_engine, embedded_model):
    items = _workload(embedded_model.tokenizer)
    reference = _run_workload(make_engine(enable_prefix_caching=False, num_blocks=512), items, concurrent=False)

    # sequential with a roomy pool: lots of hits
    roomy = make_engine(num_blocks=512)
    assert _run_workload(roomy, items, concurrent=False) == reference
    assert roomy.snapshot().prefix_cache_hits > 0

    # concurrent with a pool so small that the tree must evict and running requests get preempted
    tight = make_engine(num_blocks=20, max_num_batched_tokens=48)
    twice = items + items
    got = _run_workload(tight, twice, concurrent=True)
    for i in range(len(twice)):
        assert got[str(i)] == reference[str(i % len(items))], f"request {i}"
    assert tight.snapshot().evicted_blocks > 0
    assert tight.stats.preemptions > 0
    assert tight.snapshot().prefix_cache_hits > 0
    snap = tight.snapshot()
    assert snap.free_blocks + snap.cached_blocks == snap.total_blocks


def test_namespaces_never_share(make_engine, embedded_model):
    engine = make_engine()
    prompt = embedded_model.tokenizer.encode(SYSTEM)
    for ns, expect_hit in [("alice", False), ("bob", False), ("alice", True), ("", False)]:
        engine.add_request(prompt, _greedy(2), request_id=ns + str(expect_hit), cache_namespace=ns)
        out = run_to_completion(engine)[ns + str(expect_hit)]
        assert (out.num_cached_tokens > 0) == expect_hit, ns


def test_turn_n_reuses_turn_n_minus_1_answer(make_engine):
    engine = make_engine()
    tok = engine.tokenizer
    turns = [{"role": "user", "content": "Tell me a fact about the moon."}]
    engine.add_request(tok.encode(tok.apply_chat_template(turns)), _greedy(40), request_id="t1")
    first = run_to_completion(engine)["t1"]
    turns += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the sun?"}]
    second_prompt = tok.encode(tok.apply_chat_template(turns))
    engine.add_request(second_prompt, _greedy(4), request_id="t2")
    second = run_to_completion(engine)["t2"]
    # the answer's tokens were cached when turn 1 finished, not only turn 1's prompt
    assert second.num_cached_tokens > len(first.prompt_token_ids)


def test_identical_requests_in_one_batch_prefill_once(make_engine, embedded_model):
    engine = make_engine()
    prompt = embedded_model.tokenizer.encode(SYSTEM)
    for i in range(4):
        engine.add_request(prompt, _greedy(3), request_id=str(i))
    outs = run_to_completion(engine)
    computed = engine.stats.computed_prompt_tokens
    # the first computes the prompt; the others wait a step and read its blocks
    assert computed < len(prompt) + 3 * 16 + 4
    assert sorted(o.num_cached_tokens for o in outs.values())[1:] == [(len(prompt) - 1) // 16 * 16] * 3
    assert len({tuple(o.token_ids) for o in outs.values()}) == 1


def test_lpm_policy_prefers_cached_prefixes_without_starving(make_engine, embedded_model):
    engine = make_engine(policy="lpm", max_num_seqs=1)
    tok = embedded_model.tokenizer
    shared = tok.encode(SYSTEM)
    engine.add_request(shared + tok.encode(" Warm up."), _greedy(1), request_id="warm")
    run_to_completion(engine)
    order = []
    engine.add_request(tok.encode("An unrelated prompt about gardening and soil."), _greedy(1), request_id="cold")
    for i in range(12):
        engine.add_request(shared + tok.encode(f" Question {i}?"), _greedy(1), request_id=f"hot{i}")
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order[0].startswith("hot")  # longest cached prefix first...
    assert order.index("cold") <= engine.config.scheduler.lpm_max_skips + 1  # ...but bounded waiting


def test_cache_off_reports_zero_and_counts(make_engine, embedded_model):
    engine = make_engine(enable_prefix_caching=False)
    prompt = embedded_model.tokenizer.encode(SYSTEM)
    for i in range(2):
        engine.add_request(prompt, _greedy(2), request_id=str(i))
        assert run_to_completion(engine)[str(i)].num_cached_tokens == 0
    assert engine.snapshot().prefix_cache_queries == 0


def test_the_head_of_a_partly_matching_block_is_copied_not_shared(make_engine, embedded_model):
    """With --reuse-partial-blocks, a prompt that leaves the cached tokens inside a block reuses that block's matching head
    (copied into a private block before the forward writes the rest): the same tokens as with
    the cache off, and the tree's block is intact for the next reader."""
    base = embedded_model.tokenizer.encode(SYSTEM)[:100]
    diverging = base[:37] + [7] * 20  # diverges 5 tokens into the third block (32..47)
    off = make_engine(enable_prefix_caching=False, num_blocks=256)
    reference = {}
    for name, prompt in (("seed", base), ("diverging", diverging)):
        off.add_request(prompt, _greedy(8), request_id=name)
        reference[name] = run_to_completion(off)[name].token_ids

    engine = make_engine(num_blocks=256, reuse_partial_blocks=True)
    engine.add_request(base, _greedy(8), request_id="seed")
    run_to_completion(engine)
    engine.add_request(diverging, _greedy(8), request_id="diverging")
    out = run_to_completion(engine)["diverging"]
    assert out.num_cached_tokens == 37 and out.token_ids == reference["diverging"]
    engine.add_request(base, _greedy(8), request_id="again")  # reads the block the copy came from
    again = run_to_completion(engine)["again"]
    assert again.num_cached_tokens == 96 and again.token_ids == reference["seed"]  # whole blocks 0..95
    snap = engine.snapshot()
    assert snap.free_blocks + snap.cached_blocks == snap.total_blocks

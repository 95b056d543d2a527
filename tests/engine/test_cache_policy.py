"""Per-request cache policy: read_write (default), read_only, none. A request that may not write
leaves nothing in the prefix cache, not even the blocks it computed, and a `none` request does
not read either."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.errors import InvalidRequestError
from radixserve.request import CachePin, CachePolicy
from radixserve.sequences import common_prefix_len
from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion


def _greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _cached_prefix_len(engine, tokens: list[int]) -> int:
    """How many leading tokens of `tokens` the prefix cache holds (whole blocks), as a read_only
    request reading them reports it (a read_only request stores nothing itself)."""
    rid = f"probe-{len(engine.unfinished_request_ids())}-{engine.stats.finished_requests}"
    engine.add_request(tokens, _greedy(1), request_id=rid, cache_policy="read_only")
    return run_to_completion(engine)[rid].num_cached_tokens


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 40000) for _ in range(n)]


def _assert_no_leak(engine) -> None:
    snap = engine.snapshot()
    assert snap.free_blocks + snap.cached_blocks == snap.total_blocks
    engine.check_cache_invariants()


def test_none_stores_nothing_and_reads_nothing(make_engine):
    engine = make_engine(num_blocks=128)
    prompt = _prompt(random.Random(1), 100)
    engine.add_request(prompt, _greedy(), request_id="secret", cache_policy="none",
                       cache_pins=[CachePin(96, 60.0)])
    out = run_to_completion(engine)["secret"]
    assert out.num_cached_tokens == 0 and out.cache_write_tokens == 0
    assert engine.snapshot().cached_blocks == 0
    _assert_no_leak(engine)
    # the same prompt again, default policy: a miss, since nothing was stored
    engine.add_request(prompt, _greedy(), request_id="again")
    assert run_to_completion(engine)["again"].num_cached_tokens == 0
    # now it is cached, yet a `none` request still does not read it
    engine.add_request(prompt, _greedy(), request_id="none-reader", cache_policy=CachePolicy.NONE)
    assert run_to_completion(engine)["none-reader"].num_cached_tokens == 0


def test_read_only_reads_but_adds_nothing(make_engine):
    engine = make_engine(num_blocks=128)
    rng = random.Random(2)
    shared = _prompt(rng, 64)
    engine.add_request(shared + _prompt(rng, 5), _greedy(1), request_id="seed")
    run_to_completion(engine)
    blocks_before = engine.snapshot().cached_blocks
    engine.add_request(shared + _prompt(rng, 70), _greedy(), request_id="ro", cache_policy="read_only",
                       cache_pins=[CachePin(128, 60.0)])
    out = run_to_completion(engine)["ro"]
    assert out.num_cached_tokens == 64 and out.cache_write_tokens == 0
    assert engine.snapshot().cached_blocks == blocks_before
    assert _cached_prefix_len(engine, out.prompt_token_ids + out.token_ids) == 64  # only the shared part
    _assert_no_leak(engine)


def test_unknown_policy_is_a_typed_error(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="cache_policy"):
        engine.add_request([1, 2, 3], _greedy(), cache_policy="sometimes")


def test_no_wait_for_a_prefix_that_will_not_be_stored(make_engine):
    # A `none` request prefilling a long prompt must not hold back an identical one that
    # waits for blocks it will never insert; both finish, neither reads anything.
    engine = make_engine(num_blocks=128, max_num_batched_tokens=16)
    prompt = _prompt(random.Random(3), 64)
    engine.add_request(prompt, _greedy(2), request_id="a", cache_policy="none")
    engine.add_request(prompt, _greedy(2), request_id="b", cache_policy="read_only")
    outs = run_to_completion(engine)
    assert outs["a"].num_cached_tokens == outs["b"].num_cached_tokens == 0
    assert outs["a"].token_ids == outs["b"].token_ids
    assert engine.snapshot().cached_blocks == 0
    _assert_no_leak(engine)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policies=st.lists(st.sampled_from(list(CachePolicy)), min_size=2, max_size=6),
    seed=st.integers(0, 2**16),
    num_blocks=st.sampled_from([24, 64]),
)
def test_no_block_of_a_non_writing_request_stays_cached(make_engine, policies, seed, num_blocks):
    """Whatever the mix (shared prefixes, tight pool with preemption, chunked prefill), nothing
    computed only by a read_only or none request is left behind: of each one's tokens, the cache
    holds at most what it shares with some read_write request."""
    engine = make_engine(num_blocks=num_blocks, max_num_batched_tokens=48)
    rng = random.Random(seed)
    shared = _prompt(rng, 40)
    for i, policy in enumerate(policies):
        head = shared[: rng.choice([0, 16, 40])]
        engine.add_request(head + _prompt(rng, rng.randrange(10, 50)), _greedy(rng.randrange(1, 6)),
                           request_id=f"r{i}", cache_policy=policy)
    finals = run_to_completion(engine)
    sequences = {i: o.prompt_token_ids + o.token_ids for i, o in finals.items()}
    writers = [seq for i, seq in sequences.items() if policies[int(i[1:])] is CachePolicy.READ_WRITE]
    _assert_no_leak(engine)
    for i, seq in sorted(sequences.items()):
        if policies[int(i[1:])] is not CachePolicy.READ_WRITE:
            shared_with_writers = max((common_prefix_len(seq, w) for w in writers), default=0)
            assert _cached_prefix_len(engine, seq) <= shared_with_writers, "a block only a non-writing request computed is cached"
    _assert_no_leak(engine)


def test_no_block_of_a_none_request_in_any_tier(make_engine):
    """With a storage tier: a `none` request's blocks reach neither the tree nor the store (not on
    eviction, not by its pins, not at shutdown), and a `read_only` request loads from the store
    but stores nothing of its own."""
    from radixserve.cache.block_keys import prefix_keys

    rng = random.Random(7)
    engine = make_engine(num_blocks=8, kv_store="memory")
    identity, store = engine.cache.identity, engine.cache.store

    def stored(tokens: list[int]) -> list[bool]:
        engine.tier_io.flush()
        return store.contains(prefix_keys(identity, "", tokens))

    secret = _prompt(rng, 70)
    engine.add_request(secret, _greedy(4), request_id="secret", cache_policy="none", cache_pins=[CachePin(64, 60.0)])
    out = run_to_completion(engine)["secret"]
    engine.add_request(_prompt(rng, 100), _greedy(4), request_id="evictor")  # fills the pool
    run_to_completion(engine)
    assert not any(stored(secret + out.token_ids))

    shared = _prompt(rng, 64)
    engine.add_request(shared + [5], _greedy(4), request_id="writer")
    run_to_completion(engine)
    engine.add_request(_prompt(rng, 100), _greedy(4), request_id="evictor2")  # writes `shared` back
    run_to_completion(engine)
    assert stored(shared)[1:] == [True] * 3  # the tail was evicted (the tree trims a leaf from its end)
    own = shared + _prompt(rng, 40)
    engine.add_request(own, _greedy(4), request_id="reader", cache_policy="read_only")
    out = run_to_completion(engine)["reader"]
    assert out.cached_tokens_by_tier["storage"] > 0  # it loads...
    engine.add_request(_prompt(rng, 100), _greedy(4), request_id="evictor3")
    run_to_completion(engine)
    assert not any(stored(own + out.token_ids)[4:])  # ...but its own blocks are stored nowhere

    engine.close()  # the shutdown write-back sees only the tree
    assert not any(store.contains(prefix_keys(identity, "", secret))[:4])
    _assert_no_leak(engine)

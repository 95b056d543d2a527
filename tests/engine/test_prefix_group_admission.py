"""Prefix-grouped admission (SchedulerConfig.policy "group"): requests whose prompts share their
first 256 tokens are admitted together, so the running rows form few large groups (what cascade
attention needs), with the same outputs as first come first served and bounded overtaking."""

from __future__ import annotations

import random

from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion

PREFIX_LEN = 288  # 18 blocks of 16: longer than the 256-token group key


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 5000) for _ in range(n)]


def _admission_order(outs: dict) -> list[str]:
    """Request ids in the order the scheduler first ran them."""
    return sorted(outs, key=lambda rid: outs[rid].metrics.first_scheduled_time)


def _group_spans(outs: dict, group_of) -> list[tuple[float, float]]:
    """Per group: (first admission, last finish) of its requests, in time order."""
    spans: dict[str, list[float]] = {}
    for rid, out in outs.items():
        start, end = spans.setdefault(group_of(rid), [float("inf"), float("-inf")])
        spans[group_of(rid)] = [min(start, out.metrics.first_scheduled_time), max(end, out.metrics.finish_time)]
    return sorted(tuple(span) for span in spans.values())


def _warm(engine, prefixes: dict[str, list[int]]) -> None:
    """Compute each prefix once, so later requests hit it instead of waiting for a sibling's prefill."""
    for name, prefix in prefixes.items():
        engine.add_request(prefix + [7], _greedy(1), request_id=f"warm-{name}")
    run_to_completion(engine)


def _set(engine, **options) -> None:
    """Change scheduler options between batches (the queue is empty): one engine, one warm cache."""
    for name, value in options.items():
        setattr(engine.config.scheduler, name, value)


def test_group_admission_runs_each_group_together_with_fcfs_outputs(make_engine):
    rng = random.Random(18)
    prefixes = {g: _tokens(rng, PREFIX_LEN) for g in "abc"}
    prompts = {f"{g}{i}": prefixes[g] + _tokens(rng, 4) for g in "abc" for i in range(3)}
    order = list(prompts)
    rng.shuffle(order)
    engine = make_engine(max_num_seqs=3, num_blocks=256)
    _warm(engine, prefixes)
    results, overlapping = {}, {}
    for policy in ("fcfs", "group"):  # the same prompts, the same warm cache
        _set(engine, policy=policy)
        for rid in order:
            engine.add_request(prompts[rid], _greedy(2), request_id=f"{policy}-{rid}")
        outs = run_to_completion(engine)
        results[policy] = {rid.split("-")[1]: out.token_ids for rid, out in outs.items()}
        spans = _group_spans(outs, lambda rid: rid.split("-")[1][0])
        overlapping[policy] = any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    assert results["group"] == results["fcfs"]  # the order changes, the tokens do not
    assert not overlapping["group"]  # 3 seats: one group at a time, each group's requests together
    assert overlapping["fcfs"]  # the shuffled queue mixes them


def test_group_admission_bounds_how_often_a_request_is_overtaken(make_engine):
    rng = random.Random(7)
    prefixes = {"a": _tokens(rng, PREFIX_LEN), "b": _tokens(rng, PREFIX_LEN)}
    engine = make_engine(policy="group", max_num_seqs=2, num_blocks=256)
    _warm(engine, prefixes)
    positions = {}
    for bound in (2, 512):
        _set(engine, group_max_overtakes=bound)
        # group a's oldest request arrived first and keeps running: a's later arrivals rank ahead of b
        engine.add_request(prefixes["a"] + [11], _greedy(6), request_id="a-long")
        engine.add_request(prefixes["b"] + [12], _greedy(1), request_id="b")
        for i in range(4):
            engine.add_request(prefixes["a"] + [20 + i], _greedy(1), request_id=f"a{i}")
        positions[bound] = _admission_order(run_to_completion(engine)).index("b")
    assert positions[512] == 5  # every later request of group a went first
    assert positions[2] == 3  # after 2 overtakes it goes first: a-long, a0, a1, then b


def test_short_prompts_keep_arrival_order(make_engine):
    """A prompt of at most 256 tokens has no group (cascade attention would not share it): the
    policy admits such requests first come first served."""
    rng = random.Random(3)
    shared = _tokens(rng, 48)
    order = [f"{k}{i}" for i in range(3) for k in ("s", "t")]  # alternate two 48-token prefixes
    engine = make_engine(policy="group", max_num_seqs=1, num_blocks=128)
    for rid in order:
        prefix = shared if rid[0] == "s" else shared[::-1]
        engine.add_request(prefix + [int(rid[1]) + 3], _greedy(1), request_id=rid)
    assert _admission_order(run_to_completion(engine)) == order

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


def _record_admissions(engine) -> tuple[list[str], list[set[str]]]:
    """Wrap the engine's scheduler: (request ids in order of their first step, each step's
    request ids)."""
    admitted: list[str] = []
    steps: list[set[str]] = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        ids = [s.request.request_id for s in out.scheduled]
        admitted.extend(i for i in ids if i not in admitted)
        steps.append(set(ids))
        return out

    engine.scheduler.schedule = recording
    return admitted, steps


def _warm(engine, prefixes: dict[str, list[int]]) -> None:
    """Compute each prefix once, so later requests hit it instead of waiting for a sibling's prefill."""
    for name, prefix in prefixes.items():
        engine.add_request(prefix + [7], _greedy(1), request_id=f"warm-{name}")
    run_to_completion(engine)


def _set(engine, **options) -> None:
    """Change scheduler options between batches (the queue is empty): one engine, one warm cache."""
    for name, value in options.items():
        setattr(engine.scheduler.config, name, value)


def test_group_admission_runs_each_group_together_with_fcfs_outputs(make_engine):
    rng = random.Random(18)
    prefixes = {g: _tokens(rng, PREFIX_LEN) for g in "abc"}
    prompts = {f"{g}{i}": prefixes[g] + _tokens(rng, 4) for g in "abc" for i in range(3)}
    order = list(prompts)
    rng.shuffle(order)
    engine = make_engine(max_num_seqs=3, num_blocks=256)
    _warm(engine, prefixes)
    _, steps = _record_admissions(engine)
    results, running_groups = {}, {}
    for policy in ("fcfs", "group"):  # the same prompts, the same warm cache
        _set(engine, policy=policy)
        steps.clear()
        for rid in order:
            engine.add_request(prompts[rid], _greedy(2), request_id=f"{policy}-{rid}")
        results[policy] = {rid.split("-")[1]: out.token_ids for rid, out in run_to_completion(engine).items()}
        running_groups[policy] = [{rid.split("-")[1][0] for rid in step} for step in steps]
    assert results["group"] == results["fcfs"]  # the order changes, the tokens do not
    assert all(len(groups) == 1 for groups in running_groups["group"])  # 3 seats: one group at a time
    assert any(len(groups) > 1 for groups in running_groups["fcfs"])  # the shuffled queue mixes them


def test_group_admission_bounds_how_often_a_request_is_overtaken(make_engine):
    rng = random.Random(7)
    prefixes = {"a": _tokens(rng, PREFIX_LEN), "b": _tokens(rng, PREFIX_LEN)}
    engine = make_engine(policy="group", max_num_seqs=2, num_blocks=256)
    _warm(engine, prefixes)
    admitted, _ = _record_admissions(engine)
    positions = {}
    for bound in (2, 512):
        _set(engine, group_max_overtakes=bound)
        admitted.clear()
        # group a's oldest request arrived first and keeps running: a's later arrivals rank ahead of b
        engine.add_request(prefixes["a"] + [11], _greedy(6), request_id=f"{bound}-a-long")
        engine.add_request(prefixes["b"] + [12], _greedy(1), request_id=f"{bound}-b")
        for i in range(4):
            engine.add_request(prefixes["a"] + [20 + i], _greedy(1), request_id=f"{bound}-a{i}")
        run_to_completion(engine)
        positions[bound] = admitted.index(f"{bound}-b")
    assert positions[512] == 5  # every later request of group a went first
    assert positions[2] == 3  # after 2 overtakes it goes first: a-long, a0, a1, then b


def test_short_prompts_keep_arrival_order(make_engine):
    """A prompt of at most 256 tokens has no group (cascade attention would not share it): the
    policy admits such requests first come first served."""
    rng = random.Random(3)
    shared = _tokens(rng, 48)
    order = [f"{k}{i}" for i in range(3) for k in ("s", "t")]  # alternate two 48-token prefixes
    engine = make_engine(policy="group", max_num_seqs=1, num_blocks=128)
    admitted, _ = _record_admissions(engine)
    for rid in order:
        prefix = shared if rid[0] == "s" else shared[::-1]
        engine.add_request(prefix + [int(rid[1]) + 3], _greedy(1), request_id=rid)
    run_to_completion(engine)
    assert admitted == order

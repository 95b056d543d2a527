"""The storage tier in the engine (issue #13): real embedded model, real disk / memory stores.

A prefix served from the device, loaded from the store or recomputed gives bitwise the same
logits; eviction writes blocks down and a later request loads them; a restarted engine over the
same disk store serves what the previous one computed; the cost model's recompute choice is
honoured; corrupt, truncated, missing and un-storable records cost a recompute, never wrong KV.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch

from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion

BLOCK = 16


def _greedy(n: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def _first_logits(engine, prompt: list[int], request_id: str):
    """Run one request; return (its output, the fp32 logits its first token was sampled from)."""
    captured = []
    execute = engine.runner.execute

    def spy(step):  # records what the real forward returned; changes nothing
        logits = execute(step)
        captured.append(logits.clone())
        return logits

    engine.runner.execute = spy
    try:
        engine.add_request(prompt, _greedy(), request_id=request_id)
        out = run_to_completion(engine)[request_id]
    finally:
        engine.runner.execute = execute
    sampled = [c for c in captured if c.shape[0] == 1]
    return out, sampled[0]


def _assert_no_leak(engine) -> None:
    cache = engine.cache
    assert cache.num_free_blocks() + cache.num_cached_blocks() == cache.num_blocks
    cache.prefix_cache.check_invariants()


def _records(path: Path) -> list[Path]:
    return sorted(path.glob("blocks/*/*.kv"))


def test_logits_bitwise_equal_from_device_store_or_recomputed(make_engine, tmp_path):
    """CPU fp32. The recomputing engine prefills in chunks of the prefix's length, so its last
    step has the same shape as a cached-prefix step: a whole prompt in one forward differs from
    prefix + suffix in the last bits (CPU GEMMs pick kernels by row count), tiers or not."""
    shared = _prompt(1, 4 * BLOCK)
    first, second = shared + _prompt(2, 9), shared + _prompt(3, 7)

    # computed: nothing cached yet, so `second`'s prefix is recomputed
    cold = make_engine(num_blocks=64, kv_store=f"disk:{tmp_path}", max_num_batched_tokens=4 * BLOCK)
    out, recomputed = _first_logits(cold, second, "cold")
    assert out.num_cached_tokens == 0
    # device: `first` leaves the shared prefix in the tree, `second` reads it
    warm = make_engine(num_blocks=64)
    _first_logits(warm, first, "first")
    out, device = _first_logits(warm, second, "device")
    assert out.num_cached_tokens == 4 * BLOCK
    # storage: the cold engine wrote its blocks down at close; a new engine loads them
    cold.close()
    restarted = make_engine(num_blocks=64, kv_store=f"disk:{tmp_path}")
    out, stored = _first_logits(restarted, second, "stored")
    assert out.cached_tokens_by_tier == {"device": 0, "host": 0, "storage": 4 * BLOCK}

    assert torch.equal(device, stored)
    assert torch.equal(device, recomputed)
    assert out.token_ids == _first_logits(make_engine(num_blocks=64, enable_prefix_caching=False),
                                          second, "off")[0].token_ids


def _served_then_stored(make_engine, store_dir: Path, prompt: list[int]) -> list[int]:
    """Serve `prompt` on an engine over a disk store, close it (its blocks go down to disk) and
    return the tokens it generated."""
    writer = make_engine(num_blocks=64, kv_store=f"disk:{store_dir}")
    writer.add_request(prompt, _greedy(), request_id="w")
    want = run_to_completion(writer)["w"].token_ids
    writer.close()
    return want


def test_a_storage_load_is_read_in_the_background_while_others_run(make_engine, tmp_path):
    """The loading state: a request whose prefix is on disk waits while its records are read
    on the prefetch thread; the step it arrives in runs the others without it."""
    prompt = _prompt(30, 6 * BLOCK + 3)
    want = _served_then_stored(make_engine, tmp_path, prompt)
    engine = make_engine(num_blocks=64, kv_store=f"disk:{tmp_path}")
    engine.add_request(_prompt(31, 20), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                       request_id="busy")
    engine.step()  # busy is prefilled and decoding
    engine.add_request(prompt, _greedy(), request_id="loader", cache_report=True)
    assert [o.request_id for o in engine.step()] == ["busy"]  # loader waits for its read
    out = run_to_completion(engine)
    assert out["loader"].token_ids == want
    assert out["loader"].cached_tokens_by_tier == {"device": 0, "host": 0, "storage": 6 * BLOCK}
    report = out["loader"].cache_report  # the report counts what the storage tier served
    assert (report.reason, report.cached_tokens, report.tier_tokens) == ("full_hit", 6 * BLOCK,
                                                                         {"host": 0, "storage": 6 * BLOCK})
    assert engine.snapshot().tiers.prefetched_blocks == 6  # read off the engine thread, none at admission
    _assert_no_leak(engine)


def test_a_request_aborted_while_loading_leaves_nothing_behind(make_engine, tmp_path):
    prompt = _prompt(32, 5 * BLOCK + 1)
    _served_then_stored(make_engine, tmp_path, prompt)
    engine = make_engine(num_blocks=64, kv_store=f"disk:{tmp_path}")
    engine.add_request(prompt, _greedy(), request_id="gone")
    assert engine.step() == []  # loading
    assert engine.stats.stalled_steps == 0  # the step waited on the read: a caller steps again at once, no nap
    engine.abort_request("gone")
    assert not engine.has_unfinished_requests()
    engine.add_request(prompt, _greedy(), request_id="again")  # a new read, a clean admission
    out = run_to_completion(engine)["again"]
    assert out.cached_tokens_by_tier["storage"] == 5 * BLOCK
    _assert_no_leak(engine)


@pytest.mark.slow
def test_eviction_writes_back_and_a_later_request_loads(make_engine):
    # a pool of 8 blocks holds one 69-token request at a time: round robin evicts each
    prompts = [_prompt(10 + i, 4 * BLOCK + 5) for i in range(3)]
    reference = make_engine(num_blocks=64, enable_prefix_caching=False)
    tiered = make_engine(num_blocks=8, kv_store="memory")
    for rnd in range(2):
        for i, prompt in enumerate(prompts):
            for engine in (reference, tiered):
                engine.add_request(prompt, _greedy(), request_id=f"{rnd}-{i}")
            want = run_to_completion(reference)[f"{rnd}-{i}"]
            got = run_to_completion(tiered)[f"{rnd}-{i}"]
            assert got.token_ids == want.token_ids
            tiered.tier_io.flush()
            if rnd == 1:
                by_tier = got.cached_tokens_by_tier
                assert by_tier["storage"] > 0 and got.num_cached_tokens == 4 * BLOCK
                assert by_tier["device"] + by_tier["storage"] == got.num_cached_tokens
            _assert_no_leak(tiered)
    tiers = tiered.snapshot().tiers
    assert tiers.hit_tokens["storage"] > 0 and tiers.decisions["load"] >= 3
    assert tiered.cache.stats.evicted_blocks > 0 and tiers.written_blocks > 0


def test_cost_model_can_choose_recompute(make_engine):
    prompt = _prompt(20, 4 * BLOCK + 3)
    engine = make_engine(num_blocks=8, kv_store="memory")
    engine.add_request(prompt, _greedy(), request_id="a")
    want = run_to_completion(engine)["a"].token_ids
    engine.add_request(_prompt(21, 6 * BLOCK), _greedy(), request_id="evictor")  # pushes `a` out
    run_to_completion(engine)
    engine.tier_io.flush()
    engine.cache.cost_model.read_bytes_per_s["storage"] = 1.0  # a store slower than any prefill
    engine.add_request(prompt, _greedy(), request_id="b")
    out = run_to_completion(engine)["b"]
    assert out.token_ids == want
    assert out.cached_tokens_by_tier["storage"] == 0
    assert engine.snapshot().tiers.decisions["recompute"] == 1


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "corrupt":
        path.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    else:
        path.write_bytes(data[: len(data) // 2])


def _block_file(store_dir: Path, engine, prompt: list[int], index: int) -> Path:
    from radixserve.cache.block_keys import prefix_keys

    key = prefix_keys(engine.cache.identity, "", prompt)[index]
    return store_dir / "blocks" / key.hex()[:2] / f"{key.hex()}.kv"


@pytest.mark.slow
def test_corrupt_or_truncated_record_mid_chain_shortens_the_match(make_engine, tmp_path, caplog):
    prompt = _prompt(30, 5 * BLOCK + 2)
    for how in ("corrupt", "truncated"):
        store_dir = tmp_path / how
        first = make_engine(num_blocks=64, kv_store=f"disk:{store_dir}")
        first.add_request(prompt, _greedy(), request_id="a")
        want = run_to_completion(first)["a"].token_ids
        first.close()
        assert len(_records(store_dir)) >= 5
        _damage(_block_file(store_dir, first, prompt, 3), how)

        engine = make_engine(num_blocks=64, kv_store=f"disk:{store_dir}")
        with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
            engine.add_request(prompt, _greedy(), request_id="b")
            out = run_to_completion(engine)["b"]
        assert out.token_ids == want
        assert out.cached_tokens_by_tier["storage"] == 3 * BLOCK  # blocks 0-2; 3 on are prefilled
        assert engine.cache.store.stats.corrupt_records == 1
        assert engine.snapshot().tiers.corrupt_records == 1
        assert any("corrupt record" in r.getMessage() for r in caplog.records)
        _assert_no_leak(engine)
        engine.close()


@pytest.mark.slow
def test_a_store_smaller_than_the_working_set_keeps_serving(make_engine, tmp_path):
    """--kv-store-gb far below the working set (3 records): LRU on disk, every put that does
    not fit costs only a later recompute."""
    prompts = [_prompt(40 + i, 4 * BLOCK + 1) for i in range(3)]
    engine = make_engine(num_blocks=6, kv_store=f"disk:{tmp_path}", kv_store_gb=3 * 800_000 / 2**30)
    reference = make_engine(num_blocks=64, enable_prefix_caching=False)
    for rnd in range(2):
        for i, prompt in enumerate(prompts):
            for e in (engine, reference):
                e.add_request(prompt, _greedy(), request_id=f"{rnd}-{i}")
            assert run_to_completion(engine)[f"{rnd}-{i}"].token_ids == \
                run_to_completion(reference)[f"{rnd}-{i}"].token_ids
            engine.tier_io.flush()
            store = engine.cache.store
            assert store.used_bytes <= store.capacity_bytes and store.num_records <= 3
    assert engine.cache.store.stats.evictions > 0
    _assert_no_leak(engine)


def test_a_store_directory_that_vanishes_costs_only_recomputes(make_engine, tmp_path):
    prompt = _prompt(50, 5 * BLOCK + 3)
    engine = make_engine(num_blocks=8, kv_store=f"disk:{tmp_path / 'store'}")
    engine.add_request(prompt, _greedy(), request_id="a")
    want = run_to_completion(engine)["a"].token_ids
    engine.add_request(_prompt(51, 6 * BLOCK), _greedy(), request_id="evictor")
    run_to_completion(engine)
    engine.tier_io.flush()
    assert _records(tmp_path / "store")
    shutil.rmtree(tmp_path / "store")  # an unmounted volume, an operator's rm -rf
    engine.add_request(prompt, _greedy(), request_id="b")
    out = run_to_completion(engine)["b"]
    assert out.token_ids == want
    assert out.cached_tokens_by_tier["storage"] == 0
    _assert_no_leak(engine)
    # the store recreates its directory and goes on storing
    engine.add_request(_prompt(52, 6 * BLOCK), _greedy(), request_id="c")
    run_to_completion(engine)
    engine.tier_io.flush()
    assert _records(tmp_path / "store")


def test_tiers_off_lists_nothing(make_engine):
    engine = make_engine(num_blocks=16)
    assert engine.tier_io is None and not engine.cache.tiered
    engine.add_request(_prompt(60, 6 * BLOCK), _greedy(), request_id="a")
    engine.add_request(_prompt(61, 6 * BLOCK), _greedy(), request_id="b")
    run_to_completion(engine)
    assert not engine.cache._transfers and not engine.cache._block_keys
    assert engine.snapshot().tiers is None


_WRITER_CHILD = """
import random, sys
from radixserve.config import CacheConfig, EngineConfig, ModelConfig
from radixserve.engine import LLMEngine
from radixserve.sampling import SamplingParams
engine = LLMEngine(EngineConfig(model=ModelConfig(show_progress=False),
                                cache=CacheConfig(num_blocks=64, kv_store=sys.argv[1], kv_store_write="through")))
rng = random.Random(0)
for i in range(10_000):  # computes and writes through until killed
    engine.add_request([rng.randrange(1000, 40000) for _ in range(80)],
                       SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    print("served", i, flush=True)
"""


@pytest.mark.slow
def test_a_process_killed_mid_write_leaves_a_store_that_serves_only_right_kv(make_engine, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    store_dir = tmp_path / "store"
    child = subprocess.Popen([sys.executable, "-c", _WRITER_CHILD, f"disk:{store_dir}"], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        for _ in range(3):  # a few prompts computed and written through, more on their way
            assert child.stdout.readline().startswith("served"), "the writer process died"
        time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert _records(store_dir)

    rng = random.Random(0)  # the child's first prompt
    first = [rng.randrange(1000, 40000) for _ in range(80)]
    reference = make_engine(num_blocks=64, enable_prefix_caching=False)
    reference.add_request(first, _greedy(), request_id="ref")
    want = run_to_completion(reference)["ref"].token_ids
    engine = make_engine(num_blocks=64, kv_store=f"disk:{store_dir}")  # sweeps the killed writer's temp files
    assert not list(store_dir.glob("blocks/*/.*.tmp"))
    engine.add_request(first, _greedy(), request_id="after-kill")
    out = run_to_completion(engine)["after-kill"]
    assert out.token_ids == want
    assert out.cached_tokens_by_tier["storage"] == 4 * BLOCK
    assert engine.cache.store.stats.corrupt_records == 0

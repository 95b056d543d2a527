"""Unit tests: the engine thread wrapper (over the real engine and embedded model), TTL accounting,
tenancy, durations."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from radixserve.config import CacheConfig, EngineConfig, ModelConfig
from radixserve.engine import LLMEngine
from radixserve.errors import InvalidRequestError
from radixserve.request import RequestOutput
from radixserve.sampling import SamplingParams
from radixserve.sequences import common_prefix_len
from radixserve.server.anthropic_api import _LabelledPin, creation_by_ttl
from radixserve.server.async_engine import AsyncEngine, EngineDeadError
from radixserve.server.auth import Tenant
from radixserve.server.caches import parse_expire_time, parse_ttl
from radixserve.server.errors import APIError


class ThreadRecordingEngine(LLMEngine):
    """The real LLMEngine; only records which thread calls the methods AsyncEngine uses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: set[int] = set()

    def add_request(self, *args, **kwargs):
        self.threads.add(threading.get_ident())
        return super().add_request(*args, **kwargs)

    def abort_request(self, *args, **kwargs):
        self.threads.add(threading.get_ident())
        return super().abort_request(*args, **kwargs)

    def has_unfinished_requests(self):
        self.threads.add(threading.get_ident())
        return super().has_unfinished_requests()

    def step(self):
        self.threads.add(threading.get_ident())
        return super().step()


@pytest.fixture
def engine(embedded_model):
    return ThreadRecordingEngine(
        EngineConfig(model=ModelConfig(source="embedded", show_progress=False), cache=CacheConfig(num_blocks=128)),
        loaded=embedded_model,
    )


def _greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _all_blocks_back(engine):
    snap = engine.snapshot()
    return snap.free_blocks + snap.cached_blocks == snap.total_blocks


def _run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_async_engine_streams_outputs_in_order_from_one_thread(engine):
    finished = []
    prompts = [[1, 2, 3], [4, 5, 6, 7], "Hello"]

    async def main():
        ae = AsyncEngine(engine, on_finished=finished.append)
        ae.start()
        try:
            streams = [await ae.add_request(p, _greedy(4), request_id=f"r{i}") for i, p in enumerate(prompts)]
            results = [[out async for out in s] for s in streams]
            with pytest.raises(InvalidRequestError):
                await ae.add_request([], _greedy(4), request_id="bad")
            return results
        finally:
            await ae.stop()

    results = _run(main())
    for outs in results:
        # streamed: the new tokens of each step; the streams are read one after the other here,
        # so the steps that queued up meanwhile come joined (RequestStream.next), never lost
        assert all(o.new_token_ids for o in outs) and sum(len(o.new_token_ids) for o in outs) == 4
        assert [len(o.token_ids) for o in outs] == [0] * (len(outs) - 1) + [4]  # the whole: on the final one only
        assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length"
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads
    assert sorted(o.request_id for o in finished) == ["r0", "r1", "r2"]
    assert _all_blocks_back(engine)


def test_a_lagging_stream_gets_queued_deltas_joined_and_a_later_error_still():
    from radixserve.request import RequestMetrics
    from radixserve.server.engine_client import RequestStream

    def output(ids: list[int], text: str, finished: bool = False) -> RequestOutput:
        return RequestOutput("r", None, [1], ids, text, finished, "length" if finished else None, None, 0,
                             RequestMetrics(0.0, 0.0, 0.0, 0.0), token_ids=[5, 6, 7] if finished else [],
                             text="abc" if finished else "", new_logprobs=[f"lp{i}" for i in ids])

    async def main():
        queue = asyncio.Queue()
        stream = RequestStream(None, "r", queue)
        for item in (output([5], "a"), output([6], "b"), EngineDeadError("gone")):
            queue.put_nowait(item)
        first = await stream.next()
        with pytest.raises(EngineDeadError, match="gone"):
            await stream.next()
        queue = asyncio.Queue()
        stream = RequestStream(None, "r", queue)
        for item in (output([5], "a"), output([6], "b"), output([7], "c", finished=True)):
            queue.put_nowait(item)
        return first, [out async for out in stream]

    first, outs = _run(main())
    assert (first.new_token_ids, first.new_text, first.new_logprobs, first.finished) == ([5, 6], "ab", ["lp5", "lp6"], False)
    (final,) = outs  # all three joined: the last one's fields, every delta
    assert (final.new_token_ids, final.new_text, final.finished, final.token_ids) == ([5, 6, 7], "abc", True, [5, 6, 7])


def test_async_engine_abort_delivers_final_output(engine):
    max_tokens = 512  # far more than can be generated before the abort lands

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            stream = await ae.add_request([1, 2, 3], _greedy(max_tokens), request_id="r")
            await stream.next()
            stream.close()
            return await stream.result()
        finally:
            await ae.stop()

    final = _run(main())
    assert final.finished and final.finish_reason == "abort"
    assert 1 <= len(final.token_ids) < max_tokens
    assert engine.unfinished_request_ids() == [] and not engine.has_unfinished_requests()
    assert _all_blocks_back(engine)


def test_async_engine_survives_a_failing_step(engine):
    # fault injection on the real engine: its first step runs (blocks allocated, a forward pass
    # done), then raises; later steps run normally
    real_step = engine.step
    calls = []

    @functools.wraps(real_step)
    def step_failing_once():
        calls.append(1)
        outputs = real_step()
        if len(calls) == 1:
            raise RuntimeError("boom")
        return outputs

    engine.step = step_failing_once

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            doomed = await ae.add_request([1, 2, 3], _greedy(3), request_id="a")
            with pytest.raises(EngineDeadError, match="boom"):
                await doomed.result()
            survivor = await ae.add_request([1, 2, 3], _greedy(3), request_id="b")
            final = await survivor.result()
            return final, ae.is_running
        finally:
            await ae.stop()

    final, running = _run(main())
    assert running and final.finish_reason == "length" and len(final.token_ids) == 3
    assert len(calls) > 1
    assert engine.unfinished_request_ids() == [] and _all_blocks_back(engine)


def test_async_engine_call_runs_on_the_engine_thread(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            ident = await ae.call(threading.get_ident)
            free = await ae.call(lambda: engine.snapshot().free_blocks)
            with pytest.raises(ZeroDivisionError):
                await ae.call(lambda: 1 / 0)
            return ident, free
        finally:
            await ae.stop()

    ident, free = _run(main())
    assert ident != threading.get_ident()
    assert engine.threads <= {ident}
    assert free == engine.num_kv_blocks


@pytest.mark.parametrize("pins, cached, expected", [
    ([], 50, {"5m": 0, "1h": 0}),
    ([(64, "5m")], 0, {"5m": 64, "1h": 0}),
    ([(64, "5m")], 64, {"5m": 0, "1h": 0}),
    ([(64, "5m")], 96, {"5m": 0, "1h": 0}),
    ([(64, "1h"), (128, "5m")], 0, {"5m": 64, "1h": 64}),
    ([(64, "1h"), (128, "5m")], 80, {"5m": 48, "1h": 0}),
    ([(64, "5m"), (128, "1h")], 32, {"5m": 0, "1h": 96}),  # the 1h pin covers the whole path
])
def test_creation_by_ttl(pins, cached, expected):
    assert creation_by_ttl([_LabelledPin(n, ttl) for n, ttl in pins], cached) == expected


def test_tenant_namespaces_never_collide():
    a, b, anonymous = Tenant("aaa"), Tenant("bbb"), Tenant()
    assert a.namespace() != b.namespace()
    assert a.namespace("s") != b.namespace("s") != anonymous.namespace("s")
    assert anonymous.namespace() == ""
    # a salt cannot impersonate a key-derived namespace
    assert anonymous.namespace("key:aaa") != a.namespace()


def test_durations_and_times():
    assert parse_ttl("300s") == 300 and parse_ttl("1.5s") == 1.5 and parse_ttl(42) == 42
    for bad in ("5m", "s", "-1s", "0s", True, [1], {"s": 1}, float("nan"), float("inf"), 1e400, 2**63, 1e11,
                10**5000, "1e400s", "99999999999999s"):
        with pytest.raises(APIError) as caught:
            parse_ttl(bad)
        assert caught.value.status == 400 and caught.value.param == "ttl"
    now = 1_700_000_000  # 2023-11-14
    assert parse_expire_time("2030-01-01T00:00:00Z", now) == 1893456000
    assert parse_expire_time("2030-01-01T00:00:00", now) == 1893456000  # naive means UTC
    with pytest.raises(APIError, match="past"):
        parse_expire_time("2000-01-01T00:00:00Z", 1893456000)
    for far in ("9999-12-31T23:59:59Z", "2099-01-01T00:00:00Z"):
        with pytest.raises(APIError, match="10 years"):
            parse_expire_time(far, now)


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len("abc", "abc") == 3
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len(list(range(1000)), list(range(777)) + [-1]) == 777
    assert common_prefix_len(list(range(1000)), list(range(777)) + [-1], limit=500) == 500
    assert common_prefix_len([1, 2, 3], [1, 2, 4], limit=5) == 2


def test_serve_command_options():
    from radixserve.cli import build_parser
    from radixserve.commands.common import engine_config_from_args
    from radixserve.commands.serve import server_config_from_args

    args = build_parser().parse_args([
        "serve", "--port", "9001", "--api-key", "k1", "--api-key", "k2", "--namespace-from-api-key",
        "--min-cacheable-tokens", "64", "--max-request-bytes", "1000", "--served-model-name", "smol",
        "--cache-ttl-scale", "0.5", "--num-blocks", "128", "--enforce-eager",
    ])
    config = server_config_from_args(args)
    assert (config.host, config.port, config.api_keys) == ("127.0.0.1", 9001, ["k1", "k2"])
    assert config.namespace_from_api_key and config.min_cacheable_tokens == 64
    assert (config.max_request_bytes, config.served_model_name, config.cache_ttl_scale) == (1000, "smol", 0.5)
    engine_config = engine_config_from_args(args)
    assert engine_config.cache.num_blocks == 128 and engine_config.model.enforce_eager
    assert not engine_config_from_args(build_parser().parse_args(["serve"])).model.enforce_eager

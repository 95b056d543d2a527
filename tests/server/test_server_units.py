"""Model-free unit tests: the engine thread wrapper, TTL accounting, tenancy, durations."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from radixserve.errors import InvalidRequestError
from radixserve.request import RequestMetrics, RequestOutput
from radixserve.server.anthropic_api import _LabelledPin, creation_by_ttl
from radixserve.server.async_engine import AsyncEngine, EngineDeadError
from radixserve.server.auth import Tenant
from radixserve.server.caches import parse_expire_time, parse_ttl
from radixserve.server.errors import APIError
from radixserve.server.prompting import common_prefix_len


@dataclass
class _Stats:
    steps: int = 0


@dataclass
class FakeEngine:
    """Emits one token per step per request, `length` tokens each; records which thread ran it."""

    length: int = 3
    fail_on_step: int | None = None
    requests: dict = field(default_factory=dict)
    stats: _Stats = field(default_factory=_Stats)
    threads: set = field(default_factory=set)

    def add_request(self, prompt, params, request_id, namespace, pins, arrival):
        self.threads.add(threading.get_ident())
        if not prompt:
            raise InvalidRequestError("prompt must not be empty")
        self.requests[request_id] = 0

    def abort_request(self, request_id):
        self.threads.add(threading.get_ident())
        if self.requests.pop(request_id, None) is None:
            return None
        return _output(request_id, 0, finished=True, reason="abort")

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.threads.add(threading.get_ident())
        self.stats.steps += 1
        if self.fail_on_step == self.stats.steps:
            raise RuntimeError("boom")
        outs = []
        for request_id in list(self.requests):
            self.requests[request_id] += 1
            n = self.requests[request_id]
            done = n >= self.length
            if done:
                del self.requests[request_id]
            outs.append(_output(request_id, n, finished=done, reason="length" if done else None))
        return outs


def _output(request_id, n, finished, reason):
    return RequestOutput(request_id, None, [1], list(range(n)), "x" * n, finished, reason, None, 0,
                         RequestMetrics(0.0, None, None, None), new_token_ids=[n], new_text="x")


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_async_engine_streams_outputs_in_order_from_one_thread():
    engine = FakeEngine(length=4)
    finished = []

    async def main():
        ae = AsyncEngine(engine, on_finished=finished.append)
        ae.start()
        try:
            streams = [await ae.add_request([1], None, request_id=f"r{i}") for i in range(3)]
            results = [[o.token_ids for o in [out async for out in s]] for s in streams]
            with pytest.raises(InvalidRequestError):
                await ae.add_request([], None, request_id="bad")
            return results
        finally:
            await ae.stop()

    results = _run(main())
    assert results == [[[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]] * 3
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads
    assert sorted(o.request_id for o in finished) == ["r0", "r1", "r2"]


def test_async_engine_abort_delivers_final_output():
    engine = FakeEngine(length=10**9)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            stream = await ae.add_request([1], None, request_id="r")
            await stream.next()
            stream.close()
            final = await stream.result()
            return final
        finally:
            await ae.stop()

    final = _run(main())
    assert final.finish_reason == "abort"
    assert engine.requests == {}


def test_async_engine_survives_a_failing_step():
    engine = FakeEngine(length=2, fail_on_step=1)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            doomed = await ae.add_request([1], None, request_id="a")
            with pytest.raises(EngineDeadError, match="boom"):
                await doomed.result()
            survivor = await ae.add_request([1], None, request_id="b")
            return (await survivor.result()).finish_reason, ae.is_running
        finally:
            await ae.stop()

    assert _run(main()) == ("length", True)


def test_async_engine_call_runs_on_the_engine_thread():
    engine = FakeEngine()

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            ident = await ae.call(threading.get_ident)
            with pytest.raises(ZeroDivisionError):
                await ae.call(lambda: 1 / 0)
            return ident
        finally:
            await ae.stop()

    ident = _run(main())
    assert ident != threading.get_ident()


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
    for bad in ("5m", "s", "-1s", "0s", True):
        with pytest.raises(APIError):
            parse_ttl(bad)
    assert parse_expire_time("2030-01-01T00:00:00Z", 0) == 1893456000
    assert parse_expire_time("2030-01-01T00:00:00", 0) == 1893456000  # naive means UTC
    with pytest.raises(APIError, match="past"):
        parse_expire_time("2000-01-01T00:00:00Z", 1893456000)


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len("abc", "abc") == 3
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len(list(range(1000)), list(range(777)) + [-1]) == 777


def test_serve_command_options():
    from radixserve.cli import build_parser
    from radixserve.commands.common import engine_config_from_args
    from radixserve.commands.serve import server_config_from_args

    args = build_parser().parse_args([
        "serve", "--port", "9001", "--api-key", "k1", "--api-key", "k2", "--namespace-from-api-key",
        "--min-cacheable-tokens", "64", "--max-request-bytes", "1000", "--served-model-name", "smol",
        "--cache-ttl-scale", "0.5", "--num-blocks", "128",
    ])
    config = server_config_from_args(args)
    assert (config.host, config.port, config.api_keys) == ("127.0.0.1", 9001, ["k1", "k2"])
    assert config.namespace_from_api_key and config.min_cacheable_tokens == 64
    assert (config.max_request_bytes, config.served_model_name, config.cache_ttl_scale) == (1000, "smol", 0.5)
    assert engine_config_from_args(args).cache.num_blocks == 128

"""Probe hardening: --probe-rate-limit (429 + Retry-After in both APIs' shapes) and --shared-ttft-floor."""

from __future__ import annotations

import time

import anthropic
import openai
import pytest

from radixserve.server import ServerConfig
from radixserve.server.errors import APIError
from radixserve.server.probe_guard import ProbeRateLimiter
from tests.server.conftest import start_server

KEY_A, KEY_B = "sk-probe-a", "sk-probe-b"


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_and_says_when_to_retry():
    clock = FakeClock()
    limiter = ProbeRateLimiter(per_minute=30, burst=2, clock=clock)  # one every 2 s
    limiter.charge("a")
    limiter.charge("a")
    with pytest.raises(APIError) as err:
        limiter.charge("a")
    assert err.value.status == 429 and err.value.retry_after == 2 and err.value.code == "rate_limit_exceeded"
    limiter.charge("b")  # every key has its own bucket
    clock.now = 1.0
    with pytest.raises(APIError) as err:
        limiter.charge("a")
    assert err.value.retry_after == 1
    clock.now = 2.0
    limiter.charge("a")
    with pytest.raises(APIError) as err:
        limiter.charge("b", probes=3)  # more than a burst can ever hold: no Retry-After would help
    assert err.value.retry_after is None


@pytest.fixture(scope="module")
def limited(embedded_model):
    config = ServerConfig(api_keys=[KEY_A, KEY_B], namespace_from_api_key=True, probe_rate_limit=0.5, probe_burst=2)
    with start_server(embedded_model, config, num_blocks=256) as server:
        yield server


def test_over_the_budget_both_clients_get_429_with_retry_after(limited):
    a = limited.openai(KEY_A)
    for _ in range(2):
        a.completions.create(model="embedded", prompt="Count with me: one, two,", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        a.chat.completions.create(model="embedded", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as err:
        limited.anthropic(KEY_A).messages.create(model="embedded", max_tokens=1,
                                                 messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["error"]["type"] == "rate_limit_error" and "retry-after" in err.value.response.headers
    # a request that does not read the cache probes nothing, and B has its own budget
    a.completions.create(model="embedded", prompt="Hi", max_tokens=1, extra_body={"cache_policy": "none"})
    limited.openai(KEY_B).completions.create(model="embedded", prompt="Hi", max_tokens=1)
    # a batch of prompts is that many probes
    with pytest.raises(openai.RateLimitError):
        limited.openai(KEY_B).completions.create(model="embedded", prompt=["a", "b", "c"], max_tokens=1)


def test_the_ttft_floor_holds_for_hits_and_misses_of_a_shared_cache(embedded_model):
    floor = 1.0
    with start_server(embedded_model, ServerConfig(api_keys=[KEY_A, KEY_B], shared_ttft_floor=floor),
                      num_blocks=256) as server:
        prompt = "The quick brown fox jumps over the lazy dog. " * 8
        for key in (KEY_A, KEY_B):  # A's miss, then B's hit of A's prefix
            start = time.perf_counter()
            stream = server.openai(key).completions.create(model="embedded", prompt=prompt, max_tokens=2, stream=True,
                                                            stream_options={"include_usage": True})
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - start
                usage = chunk.usage or None
            assert first is not None and first >= floor  # a lower bound the server guarantees, not a speed claim
        assert usage.prompt_tokens_details.cached_tokens > 0  # B's request did hit

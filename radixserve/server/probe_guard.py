"""Probe hardening: a per-key rate limit on requests that read the prefix cache, and a TTFT floor
for requests that read a cache shared across keys. Both are off by default (docs/security.md
says what each defends and costs, measured by bench/bench_probe_hardening.py).

Every request that reads the cache is a probe: its TTFT and usage tell whether its prefix was
cached. Prompt-stealing attacks (InputSnatch, "The Early Bird Catches the Leak") need many
probes, one per guessed block, so a budget per key slows them by orders of magnitude while
costing an honest client nothing until it bursts past the budget.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from radixserve.server.errors import APIError


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class ProbeRateLimiter:
    """A token bucket per key: `per_minute` cache-reading requests a minute, bursts up to `burst`.

    A request over the budget gets 429 with Retry-After (whole seconds until a token is back),
    in the route's API format (OpenAI: code rate_limit_exceeded; Anthropic: rate_limit_error).
    """

    def __init__(self, per_minute: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        if not per_minute > 0:
            raise ValueError(f"the probe rate limit must be > 0 requests per minute, got {per_minute}")
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst if burst is not None else max(1, math.ceil(per_minute)))
        if self.burst < 1:
            raise ValueError(f"the probe burst must be >= 1, got {burst}")
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def charge(self, key: str, probes: int = 1) -> None:
        """Take `probes` tokens from `key`'s bucket, or raise 429 (taking none)."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= probes:
                bucket.tokens -= probes
                return
            wait = (probes - bucket.tokens) / self.rate
        if probes > self.burst:
            raise APIError(429, f"this request reads the prefix cache {probes} times, more than the burst of "
                                f"{self.burst:.0f} this key may; send fewer prompts at once", code="rate_limit_exceeded")
        raise APIError(429, f"too many requests reading the prefix cache: this key may send "
                            f"{self.rate * 60:g} a minute (bursts of {self.burst:.0f}); retry in {wait:.1f} s",
                       code="rate_limit_exceeded", retry_after=max(1, math.ceil(wait)))

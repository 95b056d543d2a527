"""Hit rate as a function of cache capacity, and where it saturates.

The curve is measured, not modelled: the log is replayed at each capacity through the real tree.
Capacities run geometrically from the smallest pool that can run every request to the pool that
never evicts (where the hit rate is the log's maximum); the knee, the smallest capacity that
reaches ``target`` x the maximum, is then narrowed down by bisection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from radixserve.advisor.logs import PromptRequest
from radixserve.advisor.replay import ReplayConfig, ReplayResult, replay


@dataclass(slots=True)
class CurvePoint:
    capacity_blocks: int
    capacity_tokens: int
    hit_rate: float
    hit_tokens: int
    refined: bool = False  # added by the bisection around the knee (not a grid point)


@dataclass(slots=True)
class CapacityCurve:
    """Measured points (ascending capacity) and the saturation point."""

    points: list[CurvePoint]
    max_hit_rate: float  # with a cache that never evicts
    target: float  # fraction of max_hit_rate that defines the knee
    knee_blocks: int | None  # smallest capacity reaching target * max_hit_rate (None: nothing hits)
    block_size: int

    @property
    def knee_tokens(self) -> int | None:
        return None if self.knee_blocks is None else self.knee_blocks * self.block_size


def capacity_curve(
    requests: Sequence[PromptRequest],
    base: ReplayConfig,
    *,
    unbounded: ReplayResult | None = None,
    known: dict[int, ReplayResult] | None = None,
    num_points: int = 10,
    target: float = 0.95,
    refine_steps: int = 6,
    on_replay: Callable[[], None] | None = None,
) -> CapacityCurve:
    """Replay ``requests`` at ``num_points`` capacities (plus up to ``refine_steps`` bisection
    steps around the knee). ``base`` gives everything but the capacity; ``unbounded`` is a
    replay of ``base`` with no capacity limit, if one was already made; ``known`` maps capacities
    (blocks) already replayed to their results, which join the curve (e.g. the configured one)."""
    block_size = base.block_size
    if unbounded is None:
        unbounded = replay(requests, dataclasses.replace(base, capacity_blocks=None))
    runnable = [r for r in requests if base.max_model_len is None or r.num_tokens + 1 <= base.max_model_len]
    lo = max((-(-(r.num_tokens + 1) // block_size) for r in runnable), default=1)
    # Enough for the largest cached state plus the request being prefilled: nothing is evicted.
    hi = max(lo, unbounded.peak_cached_blocks + lo)
    results: dict[int, ReplayResult] = {b: r for b, r in (known or {}).items() if lo <= b <= hi}

    def run(blocks: int) -> ReplayResult:
        if blocks not in results:
            results[blocks] = replay(requests, dataclasses.replace(base, capacity_blocks=blocks))
            if on_replay is not None:
                on_replay()
        return results[blocks]

    grid = sorted(set(geometric_grid(lo, hi, num_points)) | set(results))
    for blocks in grid:
        run(blocks)
    max_rate = results[hi].hit_rate
    knee: int | None = None
    if max_rate > 0:
        goal = target * max_rate
        first = next(b for b in grid if results[b].hit_rate >= goal - 1e-12)
        below = [b for b in grid if b < first]
        # Bisect between the last grid point under the goal and the first one over it (LRU hit
        # rates grow with capacity, so the bracket holds the knee).
        low, high = (below[-1], first) if below else (first, first)
        for _ in range(refine_steps):
            if high - low <= 1:
                break
            mid = (low + high) // 2
            if run(mid).hit_rate >= goal - 1e-12:
                high = mid
            else:
                low = mid
        knee = high
    on_grid = set(grid)
    points = [CurvePoint(b, b * block_size, r.hit_rate, r.hit_tokens, b not in on_grid) for b, r in sorted(results.items())]
    return CapacityCurve(points, max_rate, target, knee, block_size)


def geometric_grid(lo: int, hi: int, num_points: int) -> list[int]:
    """Up to ``num_points`` distinct integers from lo to hi (both included), evenly spaced in log."""
    if hi <= lo or num_points < 2:
        return [max(lo, hi)]
    ratio = (hi / lo) ** (1.0 / (num_points - 1))
    values = {lo, hi}
    for k in range(1, num_points - 1):
        values.add(min(hi, max(lo, round(lo * ratio**k))))
    return sorted(values)

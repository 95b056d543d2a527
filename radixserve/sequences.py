"""Comparing token sequences: shared by the scheduler, the server and the advisor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def common_prefix_len(a: Sequence[Any], b: Sequence[Any], limit: int | None = None) -> int:
    """Length of the longest common prefix of `a` and `b`, at most `limit` when one is given."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on slice equality: log(n) C-speed compares, not a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

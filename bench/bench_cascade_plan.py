"""CPU: host cost of planning a decode step's cascade (model/cascade.py `plan_cascade`), the work
a CUDA-graph decode step adds before its replay. 128 rows over ~2300-token contexts (16-token
blocks), in groups of 16 x 8, 4 x 32, and nothing shared; best of 20 x 200 calls.

    PYTHONPATH=. python3 bench/bench_cascade_plan.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from radixserve.model.cascade import plan_cascade  # noqa: E402

BLOCK = 16


def tables(groups: int, rows_per_group: int, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = groups * rows_per_group
    out = np.zeros((rows, width), dtype=np.int64)
    ids = iter(rng.permutation(1_000_000))
    for g in range(groups):
        shared = [next(ids) for _ in range(128)]
        for r in range(rows_per_group):
            i = g * rows_per_group + r
            out[i, :128] = shared
            out[i, 128:144] = [next(ids) for _ in range(16)]
    return out, np.full(rows, 2300)


def main() -> None:
    for label, (g, r) in {"8 groups x 16": (8, 16), "32 groups x 4": (32, 4), "nothing shared": (128, 1)}.items():
        t, s = tables(g, r)
        best = float("inf")
        for _ in range(20):
            t0 = time.perf_counter()
            for _ in range(200):
                plan_cascade(t, s, BLOCK)
            best = min(best, (time.perf_counter() - t0) / 200)
        print(f"plan_cascade, 128 rows, {label:15s}: {best * 1e6:6.1f} us")


if __name__ == "__main__":
    main()

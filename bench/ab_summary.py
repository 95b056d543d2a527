"""Summarise bench/device_ab.sh: the GPU speed table of two trees, each run twice, interleaved.

    python3 bench/ab_summary.py DIR     (DIR holds before-1.json, after-1.json, ... from $OUT)

Prints a markdown table: each run's figure, the median of each side and after/before.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROWS = [
    ("cold prefill, 4096 tokens", "prefill_4096_ms"),
    ("TTFT, 4032 cached + 64 new tokens", "ttft_4032_cached_64_new_ms"),
    ("decode, batch 1 (per token)", "decode_b1_ms"),
    ("decode, batch 32, 1024-token contexts (per step)", "decode_b32_ctx1024_ms"),
]


def main(folder: str) -> None:
    runs = {p.stem: json.loads(p.read_text())["ours"] for p in sorted(Path(folder).glob("*-[0-9].json"))}
    before = [k for k in runs if k.startswith("before")]
    after = [k for k in runs if k.startswith("after")]
    head = ["workload", *before, *after, "before (median)", "after (median)", "after / before"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, key in ROWS:
        b = statistics.median(runs[k][key] for k in before)
        a = statistics.median(runs[k][key] for k in after)
        cells = [f"{runs[k][key]:.2f} ms" for k in before + after]
        print(f"| {label} | " + " | ".join(cells) + f" | {b:.2f} ms | {a:.2f} ms | {a / b:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])

"""Markdown table of bench/device_admit.sh's probe runs (bench/probe_steps.py JSON files, one per
cascade mode): every burst's req/s and steps, and policy group vs fcfs over the warm shuffled
bursts (the first `--warmup` bursts of an engine are throw-away warm-ups, left out of the ratio).

    python3 bench/admit_summary.py [--warmup 1] OUT/probe-cascade_on.json [OUT/probe-cascade_off.json ...]
"""

from __future__ import annotations

import json
import statistics
import sys


def steps(burst: dict, kind: str) -> str:
    s = burst["steps"].get(kind)
    return f"{s['steps']} x {s['gpu_ms_mean']:.1f}" if s else "-"


def main(paths: list[str], warmup: int) -> None:
    print("| cascade | burst | arrivals | policy | req/s | decode-only (steps x GPU ms) | mixed | rows cascaded | host outside GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for path in paths:
        try:
            result = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"| {path}: {e} |")
            continue
        cascade = "on" if result.get("cascade_attention") else "off"
        warm: dict[str, list[float]] = {}
        for i, b in enumerate(result["bursts"]):
            print(f"| {cascade} | {i + 1}{' (warm-up)' if i < warmup else ''} | {b['arrival']} | {b.get('policy', 'fcfs')} | "
                  f"{b['req_per_s']:.1f} | {steps(b, 'decode-only')} | {steps(b, 'mixed')} | {b['cascade_rows']} | "
                  f"{b['steps']['all']['host_outside_gpu_s']:.2f} s |")
            if i >= warmup and b["arrival"] == "shuffled":
                warm.setdefault(b.get("policy", "fcfs"), []).append(b["req_per_s"])
        if "fcfs" in warm and "group" in warm:
            fcfs, group = statistics.mean(warm["fcfs"]), statistics.mean(warm["group"])
            ratios.append(f"cascade {cascade}: group {group:.1f} vs fcfs {fcfs:.1f} req/s = {group / fcfs:.3f}x "
                          f"(warm shuffled bursts: group {', '.join(f'{v:.1f}' for v in warm['group'])}; "
                          f"fcfs {', '.join(f'{v:.1f}' for v in warm['fcfs'])})")
    print()
    for line in ratios:
        print(f"- {line}")


if __name__ == "__main__":
    args = sys.argv[1:]
    warmup = 1
    if args[:1] == ["--warmup"]:
        warmup, args = int(args[1]), args[2:]
    main(args, warmup)

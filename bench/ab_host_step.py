"""A/B of the host time between GPU steps on the issue #18 workload: bench_host_step.py
--workload issue18 from two trees, alternated in one run, as a markdown table.

    git worktree add --detach /tmp/before <commit>      (a tree that has the harness)
    PYTHONPATH=. python3 bench/ab_host_step.py --before /tmp/before --after . [--rounds 4] [--json FILE]

Each round runs each tree once (a fresh process: `--bursts` bursts, the last one counted, the
earlier ones warm up), in the order before, after, after, before, ... so drift cancels. The table
gives the median over rounds of each figure and the ratio after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("decode-only", "mixed")
PARTS = ("critical", "schedule", "prep", "cascade", "post_sample", "overlapped")


def run_tree(tree: Path, bursts: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, "bench/bench_host_step.py", "--workload", "issue18", "--bursts", str(bursts),
                        "--json", str(out)], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        return json.loads(out.read_text())["bursts"][-1]


def figures(burst: dict) -> dict[str, float]:
    f = {"critical host per burst (s)": burst["critical_s"], "wall per burst, host only (s)": burst["wall_s"]}
    for kind in KINDS:
        for part in PARTS:
            f[f"{kind}: {part.replace('_', '-')} (ms/step)"] = burst[kind][f"{part}_ms"]
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            burst = run_tree(trees[name], args.bursts)
            runs[name].append(figures(burst))
            print(f"round {i + 1} {name}: critical {burst['critical_s']:.3f} s", file=sys.stderr, flush=True)
    print(f"| figure (median of {args.rounds}) | before | after | after / before |")
    print("|---|---|---|---|")
    for key in runs["before"][0]:
        b = statistics.median(r[key] for r in runs["before"])
        a = statistics.median(r[key] for r in runs["after"])
        print(f"| {key} | {b:.3f} | {a:.3f} | {a / b:.2f} |" if b else f"| {key} | {b:.3f} | {a:.3f} | - |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()

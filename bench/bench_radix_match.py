"""Benchmark RadixTree.match_prefix on a large tree (pure CPU bookkeeping, no model).

Builds a tree holding ~1M tokens (block size 16) out of 8k-token sequences: groups that share
a common system-prompt-like prefix of varying length, plus fully random ones. Then times
match_prefix of an 8k-token prompt that (a) fully hits a cached sequence, (b) misses at the
first block, (c) diverges halfway through a cached sequence (inside an edge, so the first call
splits it; later calls hit the split boundary), plus (d) a full hit along a 64-edge path.

    .venv/bin/python bench/bench_radix_match.py [--tokens 1000000] [--reps 2000]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from radixserve.cache.block_pool import BlockPool
from radixserve.cache.radix_tree import RadixTree

BLOCK_SIZE = 16
SEQ_LEN = 8192
VOCAB = 128_000  # realistic ids: mostly not small-int-cached objects, so comparisons do real work


def build_tree(total_tokens: int, seed: int) -> tuple[RadixTree, list[list[int]]]:
    rng = random.Random(seed)
    # Groups of ~8 sequences share a system-prompt-like prefix (0.5k to 6k tokens); every
    # fourth sequence is fully random. Insert until the tree holds `total_tokens`.
    num_groups = max(1, total_tokens // SEQ_LEN // 8)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.choice([512, 2048, 4096, 6144]))] for _ in range(num_groups)]
    pool = BlockPool(2 * total_tokens // BLOCK_SIZE + SEQ_LEN // BLOCK_SIZE)
    tree = RadixTree(pool, BLOCK_SIZE)
    # One sequence that 63 others branch off every 128 tokens: its path has 64 edges.
    chain = [rng.randrange(VOCAB) for _ in range(SEQ_LEN)]
    for j in range(SEQ_LEN // 128, 0, -1):
        seq = chain if j == SEQ_LEN // 128 else chain[: j * 128] + [rng.randrange(VOCAB) for _ in range(128)]
        blocks = pool.allocate(len(seq) // BLOCK_SIZE)
        tree.insert("bench", seq, blocks)
        for b in blocks:
            pool.decref(b)
    seqs: list[list[int]] = [chain]
    i = 0
    while tree.num_cached_blocks * BLOCK_SIZE < total_tokens:
        if i % 4 == 3:
            seq = [rng.randrange(VOCAB) for _ in range(SEQ_LEN)]
        else:
            prefix = prefixes[i % num_groups]
            seq = prefix + [rng.randrange(VOCAB) for _ in range(SEQ_LEN - len(prefix))]
        blocks = pool.allocate(SEQ_LEN // BLOCK_SIZE)
        tree.insert("bench", seq, blocks)
        for b in blocks:  # the "request" finishes: only the tree's refs remain
            pool.decref(b)
        seqs.append(seq)
        i += 1
    return tree, seqs


def time_match(tree: RadixTree, prompt: list[int], reps: int) -> tuple[float, float, int]:
    tree.match_prefix("bench", prompt)  # warm-up (and the one-time split for a mid-edge divergence)
    samples = []
    num_tokens = 0
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        m = tree.match_prefix("bench", prompt)
        samples.append((time.perf_counter_ns() - t0) / 1000)
        num_tokens = m.num_tokens
    return statistics.fmean(samples), statistics.median(samples), num_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens held by the tree")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    tree, seqs = build_tree(args.tokens, args.seed)
    build_s = time.perf_counter() - t0
    print(f"python {sys.version.split()[0]} on {platform.machine()} ({platform.processor() or platform.platform()})")
    print(
        f"tree: {tree.num_cached_blocks * BLOCK_SIZE} tokens, {tree.num_cached_blocks} blocks, "
        f"{tree.num_nodes} nodes, block_size={BLOCK_SIZE} (built in {build_s:.1f} s)"
    )

    rng = random.Random(args.seed + 1)
    shared = seqs[1]  # shares a 0.5k-6k prefix with other sequences: a path of 2 edges
    cases = {
        "full hit (8k cached)": list(shared),
        "full hit, 64-edge path": list(seqs[0]),
        "miss at first block": [rng.randrange(VOCAB) for _ in range(SEQ_LEN)],
        "diverge halfway": shared[: SEQ_LEN // 2 + 8] + [rng.randrange(VOCAB) for _ in range(SEQ_LEN // 2 - 8)],
    }
    # A prompt's ids come from a tokenizer, not from the tree's lists: copy so no element is
    # the identical object (identity would short-circuit the comparisons).
    cases = {k: [int(str(t)) for t in v] for k, v in cases.items()}
    print(f"{'case':<24}{'matched':>9}{'mean us':>10}{'median us':>11}   ({args.reps} reps)")
    for name, prompt in cases.items():
        mean, median, matched = time_match(tree, prompt, args.reps)
        print(f"{name:<24}{matched:>9}{mean:>10.1f}{median:>11.1f}")


if __name__ == "__main__":
    main()

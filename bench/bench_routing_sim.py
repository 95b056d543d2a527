"""Hit rate of the routing policies without timing noise: the real radix trees, KV-event
recorders, prefix index and score, no model and no Ray.

    .venv/bin/python bench/bench_routing_sim.py [--requests 160] [--system-prompts 8] [--replicas 2]
        [--prompts-per-pool 2 3 4 5 6 8]   # a sweep of pool sizes
    .venv/bin/python bench/bench_routing_sim.py --arrival shuffled --replicas 2 4 8   # a sweep of replicas

Each replica is a RadixTree over its own block pool (sized as in bench_routing.py: its share of the
system prompts fits, exactly half with 2 replicas); a request is routed, then on its replica matched
(cached tokens counted, capped as KVCacheManager does), its missing blocks allocated (LRU eviction), inserted and
released; events reach the index at once (no lag: routing quality, not event latency).
Concurrency: `--concurrency` requests in flight; when a new one arrives, a random one of them has
finished (real completion order varies with prompt and output lengths). Policies:
`single` (one replica, all traffic, every pool), `pow2` (power of two choices on the requests in
flight: two replicas at random, the one with fewer wins, ties random; with 2 idle replicas this is
random placement), and `ours`. `--arrival shuffled` sends the requests in a random order per seed
(independent users), round robin in turn (0, 1, ..., 7, 0, ...: LRU's worst case).
Writes the section `routing-sim` of docs/benchmarks.md (round robin) or `routing-sim-shuffled`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.benchmark.workloads import SystemPromptWorkload  # noqa: E402
from radixserve.cache.block_keys import CacheIdentity, prefix_keys  # noqa: E402
from radixserve.cache.block_pool import BlockPool  # noqa: E402
from radixserve.cache.radix_tree import RadixTree  # noqa: E402
from radixserve.cluster.kv_events import KVEventRecorder  # noqa: E402
from radixserve.cluster.prefix_index import PrefixIndex, choose_replica  # noqa: E402
from radixserve.model.loader import find_embedded_gguf  # noqa: E402
from radixserve.model.tokenizer import Tokenizer  # noqa: E402
from radixserve.server.prompting import ChatTurn, build_prompt  # noqa: E402

BLOCK_SIZE = 16
IDENTITY = CacheIdentity(model="embedded@sim/float32", block_size=BLOCK_SIZE)


def simulate(prompts: list[list[int]], policy: str, num_replicas: int, blocks: int, concurrency: int,
             balance: float, seed: int = 0, shuffled: bool = False) -> tuple[float, list[int]]:
    rng = random.Random(seed)
    if shuffled:  # the same order for every policy of one seed: its own generator
        prompts = prompts[:]
        random.Random(1000 + seed).shuffle(prompts)
    trees, recorders = [], []
    for _ in range(num_replicas):
        tree = RadixTree(BlockPool(blocks), BLOCK_SIZE)
        recorder = KVEventRecorder(IDENTITY)
        recorder.attach(tree)
        trees.append(tree)
        recorders.append(recorder)
    index = PrefixIndex()
    ids = [f"r{i}" for i in range(num_replicas)]
    in_flight_list: list[str] = []  # replicas of the requests in flight
    hit = total = 0
    per_replica = [0] * num_replicas
    for tokens in prompts:
        if len(in_flight_list) >= concurrency:  # one finishes first: which one varies, as real latencies do
            in_flight_list.pop(rng.randrange(len(in_flight_list)))
        in_flight = {r: in_flight_list.count(r) for r in ids}
        cacheable = (len(tokens) - 1) // BLOCK_SIZE * BLOCK_SIZE
        if policy == "ours":
            keys = prefix_keys(IDENTITY, "", tokens[:cacheable])
            held = {r: index.num_blocks_held(r) for r in ids}
            choice = choose_replica(ids, index.matched_blocks(keys, ids), in_flight, len(keys), balance, rng, held)
            replica = ids.index(choice.replica_id)
            index.note_routed(choice.replica_id, keys)
        else:
            order = ids[:]
            rng.shuffle(order)
            replica = ids.index(min(order[:2], key=lambda r: in_flight[r]))  # pow2
        in_flight_list.append(ids[replica])
        per_replica[replica] += 1
        tree = trees[replica]
        match = tree.match_prefix("m\x00", tokens, cacheable)
        hit += match.num_tokens
        total += len(tokens)
        num_full = len(tokens) // BLOCK_SIZE
        missing = num_full - len(match.block_ids)
        if missing > tree.pool.num_free():
            tree.lock(match.node)
            tree.evict(missing - tree.pool.num_free())
            tree.unlock(match.node)
        if missing > tree.pool.num_free():
            continue  # would not fit even empty
        new = tree.pool.allocate(missing)
        tree.insert("m\x00", tokens[: num_full * BLOCK_SIZE], list(match.block_ids) + new)
        tree.pool.decref_all(new)
        for i, recorder in enumerate(recorders):
            index.apply(recorder.drain(ids[i]))
    return hit / total, per_replica


def span(rates: list[float]) -> str:
    return f"{100 * min(rates):.1f}% - {100 * max(rates):.1f}%"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=384)
    p.add_argument("--replicas", type=int, nargs="+", default=[2], help="one row set per count")
    p.add_argument("--arrival", choices=("round-robin", "shuffled"), default="round-robin")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--balance", type=float, default=0.25)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--prompts-per-pool", type=int, nargs="*", default=[],
                   help="sweep: pool sizes, in system prompts one replica's pool holds "
                        "(default: system_prompts / replicas, each replica's share, as bench_routing.py)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    tokenizer = Tokenizer.from_gguf(find_embedded_gguf())
    workload = SystemPromptWorkload(num_requests=args.requests, num_system_prompts=args.system_prompts,
                                    system_tokens=args.system_tokens)
    prompts = [build_prompt(tokenizer, [ChatTurn(m["role"], [m["content"]]) for m in r.messages]).token_ids
               for r in workload.build()]
    prompt_blocks = max(len(t) for t in prompts) // BLOCK_SIZE + 1
    shuffled = args.arrival == "shuffled"
    # The hit rate when nothing is ever evicted (only first requests miss): what pow2 is compared against.
    all_fit = statistics.mean(simulate(prompts, "single", 1, prompt_blocks * len(prompts), args.concurrency,
                                       args.balance, seed, shuffled)[0] for seed in range(args.seeds))
    rows = []
    for num_replicas in args.replicas:
        for fit in args.prompts_per_pool or [args.system_prompts // num_replicas]:
            blocks = prompt_blocks * fit + 4 * args.concurrency
            rates: dict[str, list[float]] = {}
            loads: dict[str, list[int]] = {}
            for policy, n, pool in (("single", 1, blocks * num_replicas), ("pow2", num_replicas, blocks),
                                    ("ours", num_replicas, blocks)):
                for seed in range(args.seeds):
                    rate, per_replica = simulate(prompts, policy, n, pool, args.concurrency, args.balance, seed,
                                                 shuffled)
                    rates.setdefault(policy, []).append(rate)
                    loads.setdefault(policy, per_replica)  # seed 0's
            mean = {k: statistics.mean(v) for k, v in rates.items()}
            rows.append([str(num_replicas), f"{fit} ({blocks})", span(rates["single"]), span(rates["pow2"]),
                         span(rates["ours"]), f"{mean['ours'] / mean['pow2']:.2f}x",
                         f"{100 * (mean['single'] - mean['ours']):.1f}",
                         f"{mean['pow2'] / all_fit:.2f} ({fit}/{args.system_prompts} = "
                         f"{fit / args.system_prompts:.2f})",
                         " / ".join(map(str, loads["pow2"])), " / ".join(map(str, loads["ours"]))])
    order = "in a shuffled order (one per seed)" if shuffled else "round robin over the prompts"
    body = (f"Workload: {workload.summary()}, {order}, {args.concurrency} in flight; {args.seeds} seeds "
            "(hit rate: the range over seeds; ratio and gap: of the means). Real RadixTree / KVEventRecorder / "
            f"PrefixIndex / choose_replica (balance {args.balance}); no model, no Ray, no timing. `single` is one "
            "replica with all traffic and all the replicas' pools (equal memory): the ceiling, since every "
            "prompt's first request misses wherever it goes. `pow2 / nothing evicted`: pow2's hit rate over the "
            f"one when nothing is evicted ({100 * all_fit:.1f}%), beside the pool's share of the prompts: a router "
            "that ignores the cache sends every prompt to every replica, and LRU under random access keeps a "
            "requested item with probability cache / catalogue.\n\n"
            + markdown_table(["replicas", "system prompts one pool holds (blocks)", "single", "pow2", "ours",
                              "ours / pow2", "single - ours (points)", "pow2 / nothing evicted (pool share)",
                              "requests per replica pow2", "requests per replica ours"], rows))
    print(body)
    if not args.no_docs:
        # Each arrival order has its own section: the round-robin sweep of pool sizes stays beside the replicas one.
        name, title = (("routing-sim-shuffled", "Scale-out: routing policies' hit rate against replicas, shuffled "
                        "arrivals, simulated") if shuffled else
                       ("routing-sim", "Scale-out: routing policies' hit rate, simulated on the real cache code"))
        update_section(name, title, body,
                       command="python bench/bench_routing_sim.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a waiting request pays, on the engine thread, to be looked up in the storage tier:
KVCacheManager.loading() then admit() of a prompt the store does not hold (the common case),
this tree against another revision's, side by side in alternating rounds.

Since the StorageProbe change a request's prompt is hashed once and the store asked `contains`
once (loading() finds them, admission reuses them); before, both ran twice.

    python bench/bench_admission_probe.py [--base main] [--rounds 5] [--tokens 2048]

Each round runs one subprocess per tree (the base is `git archive`d to a temp dir) over the
same stores: an in-process MemoryKVStore and a real redis-server on loopback (started here;
skipped if none is installed). Prints microseconds per request (median of the rounds) and the
ratio base / this tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 16


def measure(store_spec: str, num_requests: int, num_tokens: int) -> float:
    """Microseconds per request of loading() + admit() (+ free(), which is not timed)."""
    from radixserve.cache.block_keys import CacheIdentity
    from radixserve.cache.kv_store import MemoryKVStore
    from radixserve.cache.manager import KVCacheManager
    from radixserve.cache.redis_store import open_redis_store
    from radixserve.request import Request
    from radixserve.sampling import SamplingParams

    identity = CacheIdentity("bench@0/float16", BLOCK_SIZE)
    store = MemoryKVStore(identity.describe(), 1 << 20) if store_spec == "memory" \
        else open_redis_store(store_spec, identity.describe())
    cache = KVCacheManager(num_blocks=4 * num_tokens // BLOCK_SIZE, block_size=BLOCK_SIZE, model_key="bench",
                           identity=identity, store=store, block_bytes=64 * 1024)
    elapsed = 0.0
    for i in range(num_requests):
        tokens = [(i * 7919 + t) % 50000 for t in range(num_tokens)]  # a new prompt: a miss everywhere
        request = Request(request_id=f"r{i}", prompt=None, prompt_token_ids=tokens,
                          sampling=SamplingParams(max_tokens=1))
        start = time.perf_counter()
        assert not cache.loading(request)
        cache.admit(request)
        elapsed += time.perf_counter() - start
        cache.free(request)
    store.close()
    return elapsed / num_requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="main", help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "TREE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.requests, args.tokens)))
        return

    sys.path.insert(0, str(ROOT))
    from tests.redis_server import RedisServer, find_redis_server

    with tempfile.TemporaryDirectory() as base_tree:
        archive = subprocess.run(["git", "archive", args.base, "radixserve"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
        trees = {"base": base_tree, "this": str(ROOT)}
        stores = ["memory"]
        executable = find_redis_server()
        server = RedisServer(executable) if executable else None
        if server is not None:
            server.start()
            stores.append(server.url)
        try:
            times = {(s, t): [] for s in stores for t in trees}
            for _ in range(args.rounds):
                for store in stores:
                    for name, tree in trees.items():
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", store, tree, "--requests", str(args.requests),
                             "--tokens", str(args.tokens)],
                            env={"PYTHONPATH": tree}, check=True, capture_output=True, text=True,
                        ).stdout
                        times[store, name].append(json.loads(out))
        finally:
            if server is not None:
                server.stop()
    print(f"loading() + admit() of a {args.tokens}-token miss, block_size {BLOCK_SIZE}, "
          f"{args.requests} requests x {args.rounds} rounds (median us per request)")
    for store in stores:
        base, this = (statistics.median(times[store, t]) for t in trees)
        label = "redis" if store != "memory" else "memory"
        print(f"  {label:7s} base ({args.base}) {base:8.1f}   this tree {this:8.1f}   base/this {base / this:.2f}x")


if __name__ == "__main__":
    main()

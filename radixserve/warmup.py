"""Start-up warm-up of the GPU kernels, and the on-disk cache of compiled Triton kernels.

A Triton kernel is compiled on its first launch for each combination of its constexprs and of
Triton's specializations of the other arguments (16-byte alignment of pointers; integers equal
to 1 or divisible by 16). Compiling one variant of the paged-attention kernel takes 1-3 s, so a
server that met its variants one by one while serving ran its first mixed prefill/decode steps
at 605 ms instead of 89 (issue #18: the first burst at 14.7 req/s against 43 warm).

Two things make the variants few and known in advance: every step's metadata is uploaded
16-byte aligned (cuda_graphs.aligned_offsets), and the integers that follow the batch (key
splits, query blocks, block-table width) are not specialized (triton_kernels). What is left
depends only on the kind of launch the attention planner picks (decode / short / long prefill
tiles, split or not, with or without a cascade, all sequences or a subset), which the synthetic
steps of `warmup_shapes` cover: decode-only and mixed steps at powers of two up to max_num_seqs,
prefill-only and mixed steps with fresh prompts and with suffixes over a long cached prefix, at
query lengths up to the step's token budget, and steps of the whole budget. Running them also
warms cuBLAS (lazy module loading), the allocator, and SDPA: cuDNN builds an execution plan per
sequence length (~38 ms on the H200), so the backend rounds lengths up (fresh_length_step) and
the warm-up runs each. Compiled binaries go to the Triton cache directory, so a restart loads
them from disk in seconds (start-up 15.0 s against 35.7 s over an empty cache, H200, 8B shape).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from radixserve.step import StepInput

log = logging.getLogger("radixserve.warmup")

# Prefill query lengths tried (capped at the step's token budget): below and above the paged
# kernel's short/long tile switch and the gathered-SDPA threshold (triton_attention.py).
PREFILL_QUERY_LENS = (16, 64, 256, 512, 1024, 2048)
# Context before a "long cached prefix" suffix: enough key tiles for the planner to split keys.
LONG_CONTEXT = 4096


def triton_cache_dir(configured: str | None) -> str:
    """Where compiled Triton kernels are kept: the configured directory, else $TRITON_CACHE_DIR,
    else ~/.cache/radixserve/triton (under $XDG_CACHE_HOME when set)."""
    if configured:
        return os.path.expanduser(configured)
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "radixserve", "triton")


def use_triton_cache_dir(configured: str | None) -> str:
    """Point Triton at triton_cache_dir(configured) (it reads TRITON_CACHE_DIR when it compiles
    or loads a kernel, so this works until the first launch) and create it; returns the path."""
    path = triton_cache_dir(configured)
    Path(path).mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = path
    return path


@dataclass(frozen=True, slots=True)
class WarmupShape:
    """One synthetic step: `decodes` one-token rows, then prefill rows of (new tokens, tokens
    of context before them). The decode rows share a 512-token context, long enough for cascade
    attention to read it once for all of them; with short_decodes each reads one block, too short
    for a cascade, so the decode launch without a shared-prefix part is compiled too (serving's
    first mixed steps, before rows share long prefixes, launch it)."""

    decodes: int
    prefills: tuple[tuple[int, int], ...] = ()
    short_decodes: bool = False

    @property
    def num_tokens(self) -> int:
        return self.decodes + sum(q for q, _ in self.prefills)

    @property
    def num_seqs(self) -> int:
        return self.decodes + len(self.prefills)


def warmup_shapes(
    max_num_seqs: int, max_num_batched_tokens: int, max_context: int, fresh_length_step: int | None = None
) -> list[WarmupShape]:
    """The synthetic steps that reach every attention launch variant serving can launch: each
    prefill row set alone and after one decode (the planner picks subsets by sequence id in mixed
    steps), each decode count alone and beside a short suffix, and (fresh_length_step: the
    backend's AttentionBackend.fresh_length_step) a fresh prompt of every length it rounds to.
    Steps over the token budget or the sequence limit are left out (serving never makes them);
    contexts are capped at max_context (the longest sequence the pool and the model allow)."""
    lens = [q for q in PREFILL_QUERY_LENS if q <= max_num_batched_tokens and q < max_context]
    prefill_sets: list[tuple[tuple[int, int], ...]] = []
    for i, q in enumerate(lens):
        long_context = min(LONG_CONTEXT, max_context - q)
        prefill_sets.append(((q, 0),))
        prefill_sets.append(((q, long_context),))
        if i < 4:  # several suffixes at once: more programs, so no key split
            prefill_sets.append(((q, long_context),) * 4)
    # Powers of two, the most that fit beside a suffix, and the most there are: decode launches
    # split their keys below some row count and not above it, with and without a cascade.
    decode_counts = sorted({1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs}
                           | {max(1, max_num_seqs - 1), max_num_seqs})
    short_suffix = ((lens[0], min(LONG_CONTEXT, max_context - lens[0])),) if lens else ()
    shapes = [WarmupShape(d, p) for p in prefill_sets for d in (0, 1)]
    shapes += [WarmupShape(d, ()) for d in decode_counts]
    shapes += [WarmupShape(d, short_suffix, short_decodes=s) for d in decode_counts if short_suffix for s in (False, True)]
    shapes += _full_budget_shapes(max_num_seqs, max_num_batched_tokens, max_context)
    if fresh_length_step:
        # Each length a causal SDPA call can run at (cuDNN builds a plan per length): fresh
        # prompts up to the budget, then a whole-budget chunk over a short prefix, which the
        # backend pads in front to its context (up to 1.25x the chunk: triton_attention.py).
        longest = min(max_context - 1, max_num_batched_tokens * 5 // 4)
        for n in range(fresh_length_step, longest + 1, fresh_length_step):
            new = min(n, max_num_batched_tokens)
            shapes.append(WarmupShape(0, ((new, n - new),)))
    seen: set[WarmupShape] = set()
    fits = []
    for shape in shapes:
        if shape in seen or shape.num_seqs > max_num_seqs or shape.num_tokens > max_num_batched_tokens:
            continue
        seen.add(shape)
        fits.append(shape)
    return fits


def _full_budget_shapes(max_num_seqs: int, max_num_batched_tokens: int, max_context: int) -> list[WarmupShape]:
    """Steps of the whole token budget: fresh prompts alone, and suffixes over cached prefixes
    beside decodes. They run the largest GEMMs serving runs and grow the CUDA allocator's cache
    to a full step's activations: on the H200 the first burst's first 4096-token step took 178 ms
    against 90 warm, and its mixed steps ~9% more GPU time, with only steps of <= 2049 tokens
    warmed (docs/benchmarks.md, gpu-startup)."""
    per_row = min(max(PREFILL_QUERY_LENS), max_context - 1)
    rows = -(-max_num_batched_tokens // per_row)
    if per_row < 1 or rows > max_num_seqs:
        return []
    shapes = [WarmupShape(0, ((max_num_batched_tokens // rows, 0),) * rows)]
    decodes = min(64, max_num_seqs - rows, max_num_batched_tokens // 2)
    new = (max_num_batched_tokens - decodes) // rows
    if new > 1 and max_context - new > 0:
        shapes.append(WarmupShape(decodes, ((new, min(LONG_CONTEXT, max_context - new)),) * rows))
    return shapes


def warmup_step(shape: WarmupShape, block_size: int, num_blocks: int) -> StepInput:
    """The StepInput of a synthetic shape. Every sequence reads and writes the pool's first
    blocks: at start-up no request owns any block, and whatever lands there is overwritten by
    a block's first owner before anything reads it."""
    decode_context = min(block_size - 1 if shape.short_decodes else 512, num_blocks * block_size - 1)
    rows = [(1, decode_context)] * shape.decodes + list(shape.prefills)
    seqs = []
    for new, context in rows:
        blocks = list(range(-(-(context + new) // block_size)))
        seqs.append(([0] * new, context, blocks, True))
    return StepInput.build(block_size, seqs)


def warm_up_kernels(runner, shapes: list[WarmupShape], show_progress: bool = True) -> float:
    """Run each synthetic step through the runner (eager launches and graph replays alike, as
    serving would); returns the seconds it took."""
    start = time.perf_counter()
    num_blocks = runner.kv_cache.num_blocks
    for shape in tqdm(shapes, desc="Compiling GPU kernels", unit="step", disable=not show_progress, leave=False):
        runner.execute(warmup_step(shape, runner.block_size, num_blocks))
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start

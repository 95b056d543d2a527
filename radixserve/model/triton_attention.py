"""TritonAttentionBackend: the GPU attention backend (paged prefill, paged decode, KV write).

Imported lazily (only for CUDA devices, see `default_backend`): CI machines have no Triton.

How a step is attended (the decisions are made once per step on the host, from the metadata's
host lists, and reused by every layer):
- fresh prefills (no cached prefix), when the whole step is fresh or the prefill is long
  (>= GATHER_SDPA_MIN_QUERY tokens): torch SDPA (flash) per sequence on the new tokens' own
  K/V, which the layer hands over; the pool is written but not read back;
- long prefill chunks (>= GATHER_SDPA_MIN_QUERY new tokens) over a cached prefix: the context's
  K/V gathered from the pool into a contiguous copy, then SDPA (see GATHER_SDPA_MIN_QUERY);
- everything else in up to two launches of one paged kernel, both reading K/V straight from
  the pool through the block tables: the single-token (decode) sequences with a small query
  tile, the rest (shorter prefill chunks) with a large one. When a launch has too few programs
  to fill the GPU (batch-1 decode, a short suffix after a long cached prefix) the key range is
  split across programs (flash-decoding), at most one wave of them, and the last program of
  each split group to finish merges the partial softmaxes (a separate merge kernel only when
  there are more groups than arrival counters).

Decode launch shapes depend only on the batch size, never on sequence lengths, so a decode
step can be captured in a CUDA graph and replayed for any lengths (see radixserve/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from radixserve.model import triton_kernels as K
from radixserve.model.attention import AttentionBackend, AttentionMetadata

# Launch shapes, picked by bench/bench_gpu_kernels.py on an H100 (Llama-3-8B attention shapes,
# timed over 32 layers' KV pools so that L2 is cold as in a real forward). Decode: 16 query rows
# (the GROUP query heads of one KV head, padded: tl.dot needs 16), 128 keys (8 pages) per tile.
# Prefill chunks of >= 256 tokens: 64 x 64 tiles, 3 stages. A short chunk after a long cached prefix
# (64 new after 4032 cached): 64 x 128 tiles, 3 stages, page ids prefetched a tile ahead, keys
# split so that the launch is one full wave (29.5 us a layer; 5 splits = 1.2 waves took 45 us).
DECODE_CFG = dict(block_m=16, block_n=128, num_warps=4, num_stages=2, skip_masks=False)
PREFILL_SHORT_CFG = dict(block_m=64, block_n=128, num_warps=4, num_stages=3, prefetch=True)
PREFILL_LONG_CFG = dict(block_m=64, block_n=64, num_warps=4, num_stages=3)
MAX_SPLITS = 16
# A prefill chunk of at least GATHER_SDPA_MIN_QUERY new tokens over a cached prefix gathers its
# context's K/V into a contiguous copy and runs SDPA instead of the paged kernel (H100, per layer,
# bench/bench_gpu_kernels.py --gather): with a long prefix, SDPA's bottom-right causal mask is
# 1.1-1.2x faster (1024 new over 1024 ... 2048 over 6144: the later chunks of a long prompt);
# with a short one (at most a quarter of the chunk, e.g. a shared chat-template block) the
# queries are padded at the front to the context length so that the flash kernel's plain causal
# mask applies (2140 new over 16: paged 193 us, bottom-right SDPA 211 us, fresh flash 105 us).
# Never inside a CUDA graph (it slices by host lengths).
GATHER_SDPA_MIN_QUERY = 1024
# SDPA's causal calls (fresh prefills, and a chunk over a short prefix padded in front) run at a
# length rounded up to a multiple of SDPA_LENGTH_STEP: zeros after the sequence, which no real
# row sees under the causal mask, and the pad rows dropped. cuDNN's attention builds an execution
# plan per sequence length, ~38 ms each on the H200 (bench/probe_sdpa_first_call.py, warm calls
# 0.06-0.3 ms), so unpadded every prompt of a new length stalled its step; padded there are
# max_num_batched_tokens / 256 lengths, all built by the start-up warm-up (warmup.py).
SDPA_LENGTH_STEP = 256
# Deterministic mode (set_deterministic): every sequence of a step (fresh prefill, prefill over a
# cached prefix, decode) goes through ONE launch of the paged kernel with ONE tile shape, and the
# keys are cut into fixed chunks of DETERMINISTIC_SPLIT_TILES tiles counted from position 0, each
# chunk a partial softmax folded into the running one in chunk order (by the program itself, or,
# where the launch has too few programs, by the merge of one program per chunk: same arithmetic).
# So a query's keys are always reduced in the same tiles, chunks and order, wherever its K/V came
# from and whatever else is in the launch.
# 64-row query tiles (16 tokens x 4 query heads of a KV head on Llama-3), 64-key tiles, 16 tiles
# (1024 keys) per chunk: decode at long contexts still gets several programs per KV head.
# 3 stages (bench/bench_deterministic_sweep.py, H200, 2026-11-30, one 8B layer, bits equal to 2
# stages in all four workloads): prefill 4096 726 vs 794 us, 64 after 4032 cached 32.7 vs 36.9,
# decode b1 19.4 vs 22.4, b32 53.9 vs 62.1. The walk in one loop over the tiles (flat_walk, same
# bits): decode b32 at 1024-token contexts in a CUDA graph 50.9 vs 53.9 us, the rest equal (same
# sweep, 2026-12-01).
DETERMINISTIC_CFG = dict(block_m=64, block_n=64, num_warps=4, num_stages=3, flat_walk=True)
# Launch configs by the step's longest query (the first bucket whose bound it does not pass; None:
# DETERMINISTIC_CFG). Only the key tile (block_n) and the chunk fix the order; a config may only
# enter here once bench/bench_deterministic_sweep.py shows its output equal to DETERMINISTIC_CFG's
# bit for bit in every workload (fresh prefill, cached prefill, decode b1 and b32).
# Long prefills: 128-row query tiles on 8 warps (same sweep: bits equal in all four workloads;
# prefill 4096 682 vs 726 us; slower for short queries: 42.6 vs 32.7 us at 64 new tokens), walked
# flat since the tiles before the query block skip the masks (534.5 vs 552.4 us nested, H200,
# bench/device_ab_attention.sh, 2026-12-01; nested was ahead before: 649.5 vs 660.5).
DETERMINISTIC_CFG_BY_QUERY: tuple[tuple[int, dict | None], ...] = (
    (512, None),
    (1 << 62, dict(block_m=128, block_n=64, num_warps=8, num_stages=3, flat_walk=True)),
)
DETERMINISTIC_SPLIT_TILES = 16
# Arrival counters of split launches that merge in-kernel (one per sequence x query block x KV
# head); a launch with more groups than this falls back to the separate merge kernel.
MERGE_COUNTERS = 1 << 14
# Cascade attention's shared-prefix kernel (model/cascade.py): a chunk of 16 decode rows x the
# query heads of one KV head against 64-key tiles of the prefix, 3 stages (H200, one layer, 128
# rows in 8 groups x 16 over 2048-token prefixes, bench/bench_cascade_gpu.py: 94 us against 100
# for 128-key tiles in 2 stages, 111 in 3, plain decode 179); prefix tiles split so that the
# launch fills the GPU about once at the expected number of chunks (rows / 16).
CASCADE_CFG = dict(block_n=64, num_warps=4, num_stages=3)
CASCADE_MAX_SPLITS = 8
# Prefix splits aim at this many work items per SM when the rows form full chunks.
CASCADE_ITEMS_PER_SM = 1


def sdpa_length(n: int) -> int:
    """The length a causal SDPA call over n tokens runs at (see SDPA_LENGTH_STEP)."""
    return -(-n // SDPA_LENGTH_STEP) * SDPA_LENGTH_STEP


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # TRITON_INTERPRET on CPU: any value works


def _fit_stages(cfg: dict, head_dim: int, elem_bytes: int, device: torch.device) -> dict:
    """Fewer pipeline stages where the K and V tiles of every stage would not fit in shared
    memory (3 stages of 128-key tiles need 192 KB: H100/H200 have 227 KB, many GPUs less)."""
    if device.type != "cuda":
        return cfg
    smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) or 99 * 1024
    per_stage = 2 * cfg["block_n"] * head_dim * elem_bytes
    stages = cfg["num_stages"]
    while stages > 1 and stages * per_stage > smem - 16 * 1024:
        stages -= 1
    return cfg if stages == cfg["num_stages"] else dict(cfg, num_stages=stages)


@dataclass(slots=True)
class _CascadeLaunch:
    """The shared-prefix launch of a decode launch's cascade (see model/cascade.py)."""

    num_splits: int
    cfg: dict


@dataclass(slots=True)
class _Launch:
    seq_ids: torch.Tensor | None  # None: all sequences of the batch, in order
    num_seqs: int
    n_qblocks: int
    num_splits: int
    cfg: dict
    cascade: _CascadeLaunch | None = None  # decode launches of a step with cascade metadata


@dataclass(slots=True)
class _StepPlan:
    fresh: list[tuple[int, int]]  # (first row, rows): prefills with no cached prefix, SDPA on their own K/V
    gathered: list[tuple[int, int, int, int]]  # (sequence, first row, rows, context): gather + SDPA
    launches: list[_Launch]  # paged kernel launches for the rest


class TritonModelKernels:
    """Fused elementwise ops the Llama layers use on GPU instead of chains of torch ops."""

    rms_norm = staticmethod(K.rms_norm)
    add_rms_norm = staticmethod(K.add_rms_norm)
    silu_mul = staticmethod(K.silu_mul)
    rope_write_kv = staticmethod(K.rope_write_kv)


class TritonAttentionBackend(AttentionBackend):
    """Paged attention on Triton kernels (see the module docstring)."""

    kernels = TritonModelKernels()
    fresh_length_step = SDPA_LENGTH_STEP

    def __init__(self) -> None:
        self._sdpa_gqa_ok: dict[bool, bool] = {}  # does SDPA take GQA directly? (per causal variant)
        self._counters: torch.Tensor | None = None  # zeroed once; the kernel leaves it zeroed
        self._max_model_len = 0  # deterministic mode: the longest context a graph's launch covers
        # Deterministic mode: None lets the plan choose; True / False force one program per key
        # chunk / programs walking their chunks (tests and bench/bench_batch_invariant_matmul.py).
        self.deterministic_split: bool | None = None

    def set_deterministic(self, enabled: bool, max_model_len: int) -> None:
        self.deterministic = enabled
        self._max_model_len = max_model_len

    def _merge_counters(self, device: torch.device) -> torch.Tensor:
        # Allocated on the first (eager, warm-up) call, so CUDA graphs capture this same buffer.
        if self._counters is None or self._counters.device != device:
            self._counters = torch.zeros(MERGE_COUNTERS, dtype=torch.int32, device=device)
        return self._counters

    def write_kv(self, layer_k_cache, layer_v_cache, k, v, slot_mapping) -> None:
        K.write_kv(k, v, layer_k_cache, layer_v_cache, slot_mapping)

    # ---- planning ----------------------------------------------------------------------
    def decode_splits(self, num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
        """Key-range splits for a decode launch: enough programs to fill the GPU once.
        Depends on the batch size only (CUDA graphs replay it for any context length)."""
        programs = max(1, num_seqs * num_kv_heads)
        return max(1, min(MAX_SPLITS, -(-_num_sms(device) // programs)))

    def plan(
        self, meta: AttentionMetadata, num_kv_heads: int, num_heads: int, head_dim: int, elem_bytes: int,
        device: torch.device, have_kv: bool,
    ) -> _StepPlan:  # fmt: skip
        cached = meta.backend_state.get("triton")
        if cached is not None:
            return cached
        if self.deterministic:
            plan = self._deterministic_plan(meta, num_kv_heads, num_heads, head_dim, elem_bytes, device)
            meta.backend_state["triton"] = plan
            return plan
        qlens, slens = meta.query_lens, meta.seq_lens_list
        fresh, gathered, decode, prefill = self._classify(meta, have_kv)
        launches: list[_Launch] = []
        everyone = len(qlens)
        group_p = 1 << (max(1, num_heads // num_kv_heads) - 1).bit_length()
        if decode:
            ids = None if len(decode) == everyone else torch.tensor(decode, dtype=torch.int32).to(device)
            splits = self.decode_splits(len(decode), num_kv_heads, device)
            cfg = dict(DECODE_CFG, block_m=max(DECODE_CFG["block_m"], group_p))
            cascade = None
            if self.cascade and meta.cascade is not None:
                cascade = self._cascade_launch(len(decode), meta.cascade.rows_per_chunk, num_kv_heads, head_dim,
                                               elem_bytes, device)  # fmt: skip
            launches.append(_Launch(ids, len(decode), 1, splits, cfg, cascade))
        if prefill:
            ids = None if len(prefill) == everyone else torch.tensor(prefill, dtype=torch.int32).to(device)
            launches.append(self._prefill_launch(ids, [qlens[i] for i in prefill], [slens[i] for i in prefill],
                                                 num_kv_heads, group_p, head_dim, elem_bytes, device))
        plan = _StepPlan(fresh, gathered, launches)
        meta.backend_state["triton"] = plan
        return plan

    @staticmethod
    def _cascade_launch(
        num_decode: int, rows_per_chunk: int, num_kv_heads: int, head_dim: int, elem_bytes: int, device: torch.device
    ) -> _CascadeLaunch:
        """Prefix splits from the batch size only (a CUDA graph replays them for any grouping):
        enough programs to fill the GPU once when the rows form full chunks."""
        programs = -(-num_decode // rows_per_chunk) * num_kv_heads
        splits = max(1, min(CASCADE_MAX_SPLITS, -(-CASCADE_ITEMS_PER_SM * _num_sms(device) // programs)))
        cfg = _fit_stages(dict(CASCADE_CFG), head_dim, elem_bytes, device)
        return _CascadeLaunch(splits, cfg)

    @staticmethod
    def _classify(
        meta: AttentionMetadata, have_kv: bool
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]], list[int], list[int]]:
        """Which path each sequence takes: (fresh SDPA (start, n), gathered SDPA (seq, start, n,
        context), paged decode seqs, paged prefill seqs)."""
        qlens, slens = meta.query_lens, meta.seq_lens_list
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        fresh: list[tuple[int, int]] = []
        gathered: list[tuple[int, int, int, int]] = []
        decode: list[int] = []
        prefill: list[int] = []
        # Fresh prefills take SDPA when the whole step is fresh, or when long enough to repay the
        # extra launches per sequence (in an eager mixed step each costs host time).
        all_fresh = all(n > 1 and n == s for n, s in zip(qlens, slens))
        for i, (n, s) in enumerate(zip(qlens, slens)):
            if n == 1:
                decode.append(i)
            elif meta.lengths_are_nominal:
                prefill.append(i)
            elif have_kv and n == s and (all_fresh or n >= GATHER_SDPA_MIN_QUERY):
                fresh.append((starts[i], n))
            elif n >= GATHER_SDPA_MIN_QUERY:
                gathered.append((i, starts[i], n, s))
            else:
                prefill.append(i)
        return fresh, gathered, decode, prefill

    @staticmethod
    def _prefill_launch(
        ids: torch.Tensor | None, qlens: list[int], slens: list[int], num_kv_heads: int, group_p: int,
        head_dim: int, elem_bytes: int, device: torch.device,
    ) -> _Launch:  # fmt: skip
        """The paged prefill launch over sequences of these query and context lengths."""
        max_q = max(qlens)
        cfg = PREFILL_LONG_CFG if max_q * group_p >= 1024 else PREFILL_SHORT_CFG
        cfg = _fit_stages(dict(cfg, block_m=max(cfg["block_m"], group_p)), head_dim, elem_bytes, device)
        block_q = cfg["block_m"] // group_p
        n_qblocks = -(-max_q // block_q)
        programs = sum(-(-q // block_q) for q in qlens) * num_kv_heads
        tiles = -(-max(slens) // cfg["block_n"])
        splits = 1
        sms = _num_sms(device)
        if programs < sms and tiles >= 8:  # at most one wave: a partial second wave costs a whole one
            splits = max(1, min(MAX_SPLITS, sms // programs, tiles // 4))
        return _Launch(ids, len(qlens), n_qblocks, splits, cfg)

    def _deterministic_plan(
        self, meta: AttentionMetadata, num_kv_heads: int, num_heads: int, head_dim: int, elem_bytes: int,
        device: torch.device,
    ) -> _StepPlan:  # fmt: skip
        """One launch over every sequence, the fixed tile shape and fixed key chunks. Either each
        chunk is a program of its own and the partials are folded in chunk order, or each
        (sequence, query block, KV head) program walks its chunks and folds them itself
        (num_splits 1): the same arithmetic, so the choice moves no bits. Split where the
        programs would not fill the GPU (H200, one 8B layer, 64 new over 4032 cached: 37 us split
        vs 156 walked), walk where they do: no partials, whose buffer grows with sequences x
        query blocks x chunks (a 4096-token prefill: 268 MB a layer; split it would be 741 us vs
        795 walked, not worth that). The split count only has to cover the longest context (a
        graph: any context up to max_model_len); at least 2."""
        group_p = 1 << (max(1, num_heads // num_kv_heads) - 1).bit_length()
        base = next(c for top, c in DETERMINISTIC_CFG_BY_QUERY if meta.max_query_len <= top) or DETERMINISTIC_CFG
        assert base["block_n"] == DETERMINISTIC_CFG["block_n"], "the key tile fixes the order"
        cfg = dict(base, block_m=max(base["block_m"], group_p))
        cfg = _fit_stages(cfg, head_dim, elem_bytes, device)
        block_q = cfg["block_m"] // group_p
        chunk = DETERMINISTIC_SPLIT_TILES * cfg["block_n"]
        longest = self._max_model_len if meta.lengths_are_nominal else meta.max_seq_len
        n_qblocks = -(-max(meta.max_query_len, 1) // block_q)
        if meta.lengths_are_nominal:
            programs = meta.num_seqs * n_qblocks * num_kv_heads
        else:
            programs = sum(-(-max(n, 1) // block_q) for n in meta.query_lens) * num_kv_heads
        split = programs < _num_sms(device) and longest > chunk
        if self.deterministic_split is not None:
            split = self.deterministic_split
        splits = max(2, -(-max(longest, 1) // chunk)) if split else 1
        launch = _Launch(None, meta.num_seqs, n_qblocks, splits, dict(cfg, split_tiles=DETERMINISTIC_SPLIT_TILES))
        return _StepPlan([], [], [launch])

    # ---- attention ---------------------------------------------------------------------
    def attend(self, q, layer_k_cache, layer_v_cache, meta, scale, k=None, v=None) -> torch.Tensor:
        T, H, D = q.shape
        kvh = layer_k_cache.shape[2]
        plan = self.plan(meta, kvh, H, D, q.element_size(), q.device, k is not None and v is not None)
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        for start, n in plan.fresh:
            out[start : start + n] = self._sdpa_causal(q[start : start + n], k[start : start + n], v[start : start + n], scale)
        for seq, start, n, context in plan.gathered:
            blocks = meta.block_tables[seq, : -(-context // layer_k_cache.shape[1])]
            out[start : start + n] = self.attend_gathered(q[start : start + n], layer_k_cache, layer_v_cache, blocks, context, scale)
        for launch in plan.launches:
            cascade = None
            if launch.cascade is not None:
                c = meta.cascade
                acc, ml = K.cascade_prefix_attention(
                    q, layer_k_cache, layer_v_cache, meta.block_tables, meta.query_start_loc, scale,
                    c.chunk_rows, c.chunk_prefix, c.chunk_leader, num_seqs=meta.num_seqs, capacity=c.capacity,
                    rows_per_chunk=c.rows_per_chunk, num_splits=launch.cascade.num_splits, **launch.cascade.cfg,
                )  # fmt: skip
                cascade = (c.row_prefix, acc, ml, launch.cascade.num_splits)
            K.paged_attention(
                q, layer_k_cache, layer_v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                num_seqs=launch.num_seqs, n_qblocks=launch.n_qblocks, seq_ids=launch.seq_ids,
                num_splits=launch.num_splits, counters=self._merge_counters(q.device), cascade=cascade, **launch.cfg,
            )  # fmt: skip
        return out

    def attend_gathered(self, q, layer_k_cache, layer_v_cache, blocks, context: int, scale: float) -> torch.Tensor:
        """The last q.shape[0] tokens of a `context`-token sequence (K/V already in the pool, in
        `blocks`) attend to it causally: gather its K/V into contiguous tensors, then SDPA with
        the causal mask aligned bottom-right (query row r sees keys up to context - rows + r)."""
        n, kvh, D = q.shape[0], layer_k_cache.shape[2], layer_k_cache.shape[3]
        k = layer_k_cache.index_select(0, blocks).reshape(-1, kvh, D)[:context]
        v = layer_v_cache.index_select(0, blocks).reshape(-1, kvh, D)[:context]
        prefix = context - n
        if prefix * 4 <= n:  # short prefix: pad the queries in front, plain causal flash, drop the pad
            padded = torch.cat([q.new_zeros(prefix, q.shape[1], D), q])
            return self._sdpa(padded, k, v, scale, None)[prefix:]
        return self._sdpa(q, k, v, scale, causal_lower_right(n, context))

    def _sdpa_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of one fresh sequence: q [L, H, D], k/v [L, KV, D] -> [L, H, D]."""
        return self._sdpa(q, k, v, scale, None)

    def _sdpa(self, q, k, v, scale: float, lower_right) -> torch.Tensor:
        """SDPA over q [Lq, H, D], k/v [Lk, KV, D] -> [Lq, H, D]; causal top-left when lower_right
        is None (Lq == Lk; run at sdpa_length(Lq)), else the given bottom-right causal bias. GQA
        natively where this torch and kernel take it (remembered per variant), else with the KV
        heads expanded (a copy)."""
        n = q.shape[0]
        if lower_right is None:  # a length cuDNN has a plan for (see SDPA_LENGTH_STEP)
            # cuDNN keys its plans by strides too. F.pad returns contiguous tensors, so an unpadded
            # call (q/k/v views of the QKV projection) is made contiguous as well: else the plan
            # the warm-up built at a multiple of the step was not the one serving's padded calls
            # at that length take (~40 ms each, once per length, in the first step of a process).
            extra = sdpa_length(n) - n
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x.contiguous() for x in (q, k, v))
        qt, kt, vt = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
        mask = dict(is_causal=True) if lower_right is None else dict(attn_mask=lower_right)
        variant = lower_right is not None
        if q.shape[1] != k.shape[1]:
            if self._sdpa_gqa_ok.get(variant) is not False:
                try:
                    o = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True, **mask)
                    self._sdpa_gqa_ok[variant] = True
                    return o[0].transpose(0, 1)[:n]
                except (RuntimeError, TypeError, NotImplementedError):
                    self._sdpa_gqa_ok[variant] = False
            rep = q.shape[1] // k.shape[1]
            kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, **mask)
        return o[0].transpose(0, 1)[:n]

"""Triton kernels of the GPU path: paged attention (prefill and decode), the KV write, and the
small fused elementwise ops around the matmuls (RMSNorm, residual add + RMSNorm, SiLU-and-mul,
RoPE + KV write).

Only imported on a CUDA device (or under TRITON_INTERPRET=1 for CPU debugging): CI has no
Triton. The wrappers that pick launch shapes live in triton_attention.py; this module holds
the kernels themselves and thin launchers.

Why the elementwise kernels exist: a decode step of an 8B model reads ~16 GB of weights in
~5.4 ms, and every extra tiny kernel costs 2-3 us even inside a CUDA graph. The torch ops of
one layer (norms in fp32, RoPE as slices + cat, SiLU * up) are ~40 launches; fused they are ~10.
The fused kernels round to the model dtype at the same points as the torch reference (and as
transformers), so they agree with it to the last bit in most elements.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# Re-launch compiled kernels directly (see _Launcher); RADIXSERVE_TRITON_FAST_LAUNCH=0 turns it off.
FAST_LAUNCH = os.environ.get("RADIXSERVE_TRITON_FAST_LAUNCH", "1") != "0"


class _Launcher:
    """Launches a @triton.jit kernel, re-using its compiled binary without Triton's per-call
    argument binding: that path costs 30-50 us of host time per launch (measured on the H100
    machine, Triton 3.6) against ~7 us for a torch op, and an eager prefill step of an 8B
    model makes ~200 Triton launches.

    The key holds what Triton specializes a binary on, computed the same way: constexprs and
    launch options; per tensor its dtype and 16-byte alignment; per integer whether it is 1,
    a multiple of 16, and 64-bit. (Those specializations matter: without the divisibility of
    the strides the loads are not vectorized and attention runs 4-5x slower.) Arguments go in
    signature order, runtime ones then constexprs, as every kernel here is written."""

    def __init__(self, fn, unspecialized: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.cache: dict = {}
        # Positions of the integer arguments the kernel declares `do_not_specialize`: Triton keys
        # its binary on their width only, and so does this cache.
        names = list(inspect.signature(fn.fn).parameters)
        self._plain = frozenset(names.index(name) for name in unspecialized)

    @staticmethod
    def _spec(a) -> object:
        if isinstance(a, torch.Tensor):
            return (a.dtype, a.data_ptr() % 16 == 0)
        if isinstance(a, bool):
            return ("b", a)
        if isinstance(a, int):
            return (a == 1, a % 16 == 0, not -(2**31) <= a < 2**31)
        return type(a)

    def _key(self, args: tuple) -> tuple:
        plain = self._plain
        return tuple(not -(2**31) <= a < 2**31 if i in plain else self._spec(a) for i, a in enumerate(args))

    def __call__(self, grid: tuple, args: tuple, consts: dict, num_warps: int, num_stages: int | None = None) -> None:
        key = (self._key(args), tuple(consts.values()), num_warps, num_stages)
        kernel = self.cache.get(key) if FAST_LAUNCH else None
        if kernel is not None:
            stream = torch.cuda.current_stream().cuda_stream
            kernel.run(
                grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                kernel.function, kernel.packed_metadata, None, None, None, *args, *consts.values(),
            )  # fmt: skip
            return
        options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
        compiled = self.fn[grid](*args, **consts, **options)
        if FAST_LAUNCH and compiled is not None and hasattr(compiled, "packed_metadata"):
            compiled.run  # noqa: B018 (loads the binary and the launcher now, not in a CUDA graph capture)
            self.cache[key] = compiled


# ---- paged attention ---------------------------------------------------------------------


@triton.jit
def _merge_step(run_m, run_l, run_acc, m_c, l_c, acc_c):
    """Deterministic mode: fold one key chunk's partial (max, sum, unnormalized accumulator) into
    the running one, chunk after chunk in order from position 0. The one-program walk over every
    chunk and the merge of split partials both do exactly this, so they give the same bits. An
    empty chunk (m = -inf, l = 0, acc = 0) is an exact no-op."""
    m_new = tl.maximum(run_m, m_c)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    w_run = tl.exp2(run_m - m_use)
    w_c = tl.exp2(m_c - m_use)
    return m_new, run_l * w_run + l_c * w_c, run_acc * w_run[:, None] + acc_c * w_c[:, None]


@triton.jit
def _tile_keys(t, kv_begin, kv_end, BLOCK_N: tl.constexpr):
    """Key tile t of a sequence: its positions and which of them are walked ([kv_begin, kv_end))."""
    kpos = t * BLOCK_N + tl.arange(0, BLOCK_N)
    return kpos, (kpos < kv_end) & (kpos >= kv_begin)


@triton.jit
def _tile_pages(bt_row, kpos, k_ok, PAGE: tl.constexpr):
    """The pool blocks that hold the keys at kpos (0 where not k_ok)."""
    return tl.load(bt_row + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)


@triton.jit
def _attend_tile(
    q, k_cache_ptr, v_cache_ptr, blk, kpos, k_ok, kvh, q_pos, scale_log2e, m_i, l_i, acc,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
    CAUSAL: tl.constexpr = True, MASKED: tl.constexpr = True,
):  # fmt: skip
    """One key tile's online-softmax step on (max, sum, accumulator), in base 2: the keys at
    kpos (pool blocks blk) where k_ok, each visible to the rows at or after it (CAUSAL; else to
    every row). Every attention loop here goes through it: the default and deterministic paged
    walks and the cascade prefix kernel. MASKED=False: a tile whose keys all exist and are all
    visible to every row (wholly before the query block): no load masks and no select, the same
    arithmetic, so the same bits as the masked step would give."""
    in_page = (kpos % PAGE).to(tl.int64)
    k_ptrs = k_cache_ptr + (blk * stride_kb + in_page * stride_ks + kvh * stride_kh)[:, None] + offs_d[None, :]
    v_ptrs = v_cache_ptr + (blk * stride_vb + in_page * stride_vs + kvh * stride_vh)[:, None] + offs_d[None, :]
    if MASKED:
        if HEAD_DIM == HEAD_DIM_P:
            kv_mask = k_ok[:, None]
        else:
            kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    elif HEAD_DIM == HEAD_DIM_P:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        if CAUSAL:
            visible = (kpos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        else:
            visible = k_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    # Scores stay unscaled: the row max is scaled once (scaling is monotonic, so it is the max of
    # the scaled scores) and exp2 takes s * scale - max in one explicit fused multiply-add, as
    # FlashAttention-3 does. Explicit, so the compiler's contraction of a multiply into the
    # subtraction cannot differ between masked and unmasked tiles.
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2e)
    # A row that has seen no visible key yet keeps m = -inf; use 0 so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(tl.fma(s, scale_log2e, -m_use[:, None]))
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif HEAD_DIM == HEAD_DIM_P:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _walk_tiles(
    q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_begin, t_end, kv_begin, kv_end, scale_log2e, m_i, l_i, acc,
    blk_next, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    PREFETCH: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Key tiles [t_begin, t_end) of the keys [kv_begin, kv_end), in order, into the running
    state; returns it and (PREFETCH) the page ids of tile t_end, loaded one iteration ahead
    (hides that latency; blk_next holds tile t_begin's on entry)."""
    for t in range(t_begin, t_end):
        kpos, k_ok = _tile_keys(t, kv_begin, kv_end, BLOCK_N)
        if PREFETCH:
            blk = blk_next
            after = kpos + BLOCK_N
            blk_next = _tile_pages(bt_row, after, after < kv_end, PAGE)
        else:
            blk = _tile_pages(bt_row, kpos, k_ok, PAGE)
        m_i, l_i, acc = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, blk, kpos, k_ok, kvh, q_pos, scale_log2e, m_i, l_i, acc,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
            HEAD_DIM, HEAD_DIM_P, PAGE, IEEE, CAUSAL=CAUSAL, MASKED=MASKED,
        )  # fmt: skip
    return m_i, l_i, acc, blk_next


@triton.jit
def _attend_chunk(
    q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_begin, t_end, t_full, kv_end, scale_log2e,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Deterministic mode: online softmax over key tiles [t_begin, t_end) from a fresh state;
    returns (max, sum, unnormalized accumulator). Tiles before t_full are visible to every row
    and skip the masks."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    t_mid = tl.maximum(t_begin, tl.minimum(t_end, t_full))
    m_i, l_i, acc, _ = _walk_tiles(
        q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_begin, t_mid, 0, kv_end, scale_log2e, m_i, l_i, acc, 0,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
        HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_N, IEEE, False, True, False,
    )  # fmt: skip
    m_i, l_i, acc, _ = _walk_tiles(
        q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_mid, t_end, 0, kv_end, scale_log2e, m_i, l_i, acc, 0,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
        HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_N, IEEE, False, True, True,
    )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def _walk_flat(
    q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_begin, t_end, num_tiles, kv_end, scale_log2e,
    m_i, l_i, acc, m_c, l_c, acc_c, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SPLIT_TILES: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Deterministic mode's flat walk over tiles [t_begin, t_end): each tile into the chunk's
    state (m_c, l_c, acc_c), folded into the running one (m_i, l_i, acc) after the chunk's last
    tile, which then restarts from empty."""
    for t in range(t_begin, t_end):
        kpos, k_ok = _tile_keys(t, 0, kv_end, BLOCK_N)
        blk = _tile_pages(bt_row, kpos, k_ok, PAGE)
        m_c, l_c, acc_c = _attend_tile(
            q, k_cache_ptr, v_cache_ptr, blk, kpos, k_ok, kvh, q_pos, scale_log2e, m_c, l_c, acc_c,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
            HEAD_DIM, HEAD_DIM_P, PAGE, IEEE, MASKED=MASKED,
        )  # fmt: skip
        if (t % SPLIT_TILES == SPLIT_TILES - 1) or (t == num_tiles - 1):
            m_i, l_i, acc = _merge_step(m_i, l_i, acc, m_c, l_c, acc_c)
            m_c = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_c = tl.zeros([BLOCK_M], tl.float32)
            acc_c = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    return m_i, l_i, acc, m_c, l_c, acc_c


@triton.jit
def _merge_splits(
    out_ptr, part_acc_ptr, part_ml_ptr, base, num_splits, q_start, tok, head, row_ok,
    rows, stride_ot, stride_oh, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr,
    SEQUENTIAL: tl.constexpr = False,
):  # fmt: skip
    """Merge the partials base..base+num_splits of one (sequence, query block, KV head): rescale
    each by 2^(m_s - max m), divide by the rescaled sum of l, write the rows to out. Loads
    bypass L1 (.cg): with FUSE_MERGE the partials were just written by other SMs.
    SEQUENTIAL (deterministic mode): fold them in split order with _merge_step instead, as the
    one-program walk over the same chunks does."""
    offs_d = tl.arange(0, HEAD_DIM_P)
    if SEQUENTIAL:
        run_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        run_l = tl.zeros([BLOCK_M], tl.float32)
        run_acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        for s in range(0, num_splits):
            idx = (base + s) * BLOCK_M + rows
            m_s = tl.load(part_ml_ptr + idx * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(part_ml_ptr + idx * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
            a = tl.load(part_acc_ptr + idx[:, None] * HEAD_DIM_P + offs_d[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
            run_m, run_l, run_acc = _merge_step(run_m, run_l, run_acc, m_s, l_s, a)
        out = run_acc / tl.where(run_l > 0, run_l, 1.0)[:, None]
        tl.store(
            out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
        )
        return
    m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, num_splits):
        m_s = tl.load(part_ml_ptr + ((base + s) * BLOCK_M + rows) * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        m_max = tl.maximum(m_max, m_s)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    for s in range(0, num_splits):
        idx = (base + s) * BLOCK_M + rows
        m_s = tl.load(part_ml_ptr + idx * 2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_ml_ptr + idx * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
        w = tl.exp2(m_s - m_use)  # an empty split has m = -inf: weight 0
        a = tl.load(part_acc_ptr + idx[:, None] * HEAD_DIM_P + offs_d[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        l_tot += l_s * w
        acc += a * w[:, None]
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
    )


# Integers of the attention kernels that change from step to step with the batch (key-range
# splits, query blocks per sequence, the block table's width). Triton would compile a binary for
# each value that is 1, each multiple of 16 and each other value: 3 x 3 x 3 variants met one by
# one during serving, each a 1-3 s compile inside a step. None of them is on a hot path (index
# arithmetic once per program), so one binary serves every value, and the start-up warm-up
# (radixserve/warmup.py) can compile all that serving will launch.
ATTENTION_UNSPECIALIZED = ("num_splits", "n_qblocks", "stride_bt", "cascade_splits", "cascade_stride")
COMBINE_UNSPECIALIZED = ("num_splits", "n_qblocks")


@triton.jit(do_not_specialize=ATTENTION_UNSPECIALIZED)
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    counters_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    seq_ids_ptr,
    cascade_len_ptr,
    cascade_acc_ptr,
    cascade_ml_ptr,
    scale_log2e,
    num_splits,
    n_qblocks,
    cascade_splits,
    cascade_stride,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSE_MERGE: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_SEQ_IDS: tl.constexpr,
    IEEE: tl.constexpr,
    SPLIT_TILES: tl.constexpr = 0,
    CASCADE: tl.constexpr = False,
    FLAT_WALK: tl.constexpr = False,
    SKIP_MASKS: tl.constexpr = True,
):
    """One program: one sequence, BLOCK_M // GROUP_P of its new tokens times the GROUP query
    heads sharing one KV head (so each K/V tile is loaded once for all of them), and one slice
    (split) of the key range. Flash-attention online softmax in base 2. K/V rows are gathered
    from the pool through the block table, tile by tile: no contiguous copy is ever made.

    SPLIT=False: normalize and write out[T, H, D]. SPLIT=True: write the unnormalized partial
    accumulator with its running max and sum; then either _combine_splits_kernel merges the
    splits (a second launch), or, with FUSE_MERGE, the last split program of each (sequence,
    query block, KV head) to finish merges them itself: a per-group arrival counter tells it
    that it is last (the counter is reset for the next launch by that same program).

    SKIP_MASKS: tiles wholly before the query block (every row sees every key) go through an
    unmasked loop, the rest through a masked one (same bits; deterministic launches always do).
    Off for decode launches: a second pipelined loop for their one masked tile cost more than
    the masks (plain decode of 128 rows 11% slower on the H200).

    CASCADE (decode launches, see model/cascade.py): the first cascade_len[seq] keys of the
    sequence were attended by _cascade_prefix_kernel, once for its whole group; this program
    reads only the keys after them, and its split 0 folds the prefix kernel's partials (one per
    prefix split, at [(split * cascade_stride + seq) * heads + head]) into its own state.
    """
    s_idx = tl.program_id(0)
    if SPLIT_TILES > 0:
        # Deterministic launches (the same bits in any order): the longest query blocks start
        # first (causal: a block's keys grow with its index), and split-major programs, so a
        # graph's launch, whose splits cover max_model_len, puts its non-empty chunks first and
        # spreads them over the SMs instead of pairing them on half of them between the empty ones.
        qb = n_qblocks - 1 - tl.program_id(1)
        split = tl.program_id(2) // NUM_KV_HEADS
        kvh = tl.program_id(2) % NUM_KV_HEADS
    else:
        qb = tl.program_id(1)
        kvh = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
    if USE_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + s_idx).to(tl.int64)
    else:
        seq = s_idx.to(tl.int64)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + rows // GROUP_P  # new-token index within the sequence
    hg = rows % GROUP_P
    row_ok = (tok < q_len) & (hg < GROUP)
    head = kvh * GROUP + hg
    q_pos = ctx_len + tok
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # This query block sees keys [0, kv_end): causality bounds it by its last token.
    kv_end = ctx_len + tl.minimum(q_len, (qb + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    bt_row = block_tables_ptr + seq * stride_bt
    if CASCADE:  # keys before kv_begin were attended by the cascade prefix kernel
        kv_begin = tl.load(cascade_len_ptr + seq)
    else:
        kv_begin = 0
    # Tiles before t_full end at or before the block's first query position: every row sees
    # all their keys, so they skip the masks (most of a long walk).
    t_full = (ctx_len + qb * BLOCK_Q + 1) // BLOCK_N
    if SPLIT_TILES > 0:
        # Deterministic mode: fixed key chunks of SPLIT_TILES tiles counted from position 0, each
        # reduced from a fresh state and folded in chunk order (_merge_step), so a query's keys
        # are reduced the same way whatever the launch (see triton_attention.py). SPLIT: this
        # program does chunk `split` and the merge folds the partials; else it walks them all.
        if SPLIT:
            t_begin = split * SPLIT_TILES
            if FUSE_MERGE and t_begin >= num_tiles:
                # An empty chunk is an exact no-op in the fold: neither stored nor counted (a CUDA
                # graph's launch has splits for max_model_len; a 4096-token context uses a few).
                return
            m_i, l_i, acc = _attend_chunk(
                q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_begin, tl.minimum(t_begin + SPLIT_TILES, num_tiles),
                t_full, kv_end, scale_log2e, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_ok, HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_M, BLOCK_N, IEEE,
            )  # fmt: skip
        elif FLAT_WALK:
            # The same tiles and folds in one loop over the tiles (the nested walk drains the
            # software pipeline at every chunk end), split where the masks start.
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
            m_c = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_c = tl.zeros([BLOCK_M], tl.float32)
            acc_c = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
            t_mid = tl.minimum(num_tiles, t_full)
            m_i, l_i, acc, m_c, l_c, acc_c = _walk_flat(
                q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, 0, t_mid, num_tiles, kv_end, scale_log2e,
                m_i, l_i, acc, m_c, l_c, acc_c, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_ok, HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_M, BLOCK_N, IEEE, SPLIT_TILES, False,
            )  # fmt: skip
            m_i, l_i, acc, m_c, l_c, acc_c = _walk_flat(
                q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_mid, num_tiles, num_tiles, kv_end, scale_log2e,
                m_i, l_i, acc, m_c, l_c, acc_c, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_ok, HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_M, BLOCK_N, IEEE, SPLIT_TILES, True,
            )  # fmt: skip
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
            for c in range(0, tl.cdiv(num_tiles, SPLIT_TILES)):
                m_c, l_c, acc_c = _attend_chunk(
                    q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, c * SPLIT_TILES,
                    tl.minimum(c * SPLIT_TILES + SPLIT_TILES, num_tiles), t_full, kv_end, scale_log2e,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
                    HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_M, BLOCK_N, IEEE,
                )  # fmt: skip
                m_i, l_i, acc = _merge_step(m_i, l_i, acc, m_c, l_c, acc_c)
    else:
        first_tile = kv_begin // BLOCK_N
        per_split = tl.cdiv(num_tiles - first_tile, num_splits)
        t_begin = first_tile + split * per_split
        t_end = tl.minimum(t_begin + per_split, num_tiles)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        blk_next = 0
        if PREFETCH:  # the first tile's page ids (_walk_tiles loads each next one a tile ahead)
            first, first_ok = _tile_keys(t_begin, 0, kv_end, BLOCK_N)
            blk_next = _tile_pages(bt_row, first, first_ok, PAGE)
        if SKIP_MASKS:
            # Masked where a tile holds keys before kv_begin (a cascade's prefix ends inside it)
            # or keys some row may not see; unmasked between.
            t_lo = t_begin
            if CASCADE:
                t_lo = tl.maximum(t_begin, tl.minimum(t_end, tl.cdiv(kv_begin, BLOCK_N)))
                m_i, l_i, acc, blk_next = _walk_tiles(
                    q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_begin, t_lo, kv_begin, kv_end, scale_log2e,
                    m_i, l_i, acc, blk_next, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    offs_d, d_ok, HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_N, IEEE, PREFETCH, True, True,
                )  # fmt: skip
            t_mid = tl.maximum(t_lo, tl.minimum(t_end, t_full))
            m_i, l_i, acc, blk_next = _walk_tiles(
                q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_lo, t_mid, kv_begin, kv_end, scale_log2e,
                m_i, l_i, acc, blk_next, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                offs_d, d_ok, HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_N, IEEE, PREFETCH, True, False,
            )  # fmt: skip
        else:
            t_mid = t_begin
        m_i, l_i, acc, blk_next = _walk_tiles(
            q, k_cache_ptr, v_cache_ptr, bt_row, kvh, q_pos, t_mid, t_end, kv_begin, kv_end, scale_log2e,
            m_i, l_i, acc, blk_next, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            offs_d, d_ok, HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_N, IEEE, PREFETCH, True, True,
        )  # fmt: skip

    if CASCADE:
        if split == 0:
            if kv_begin > 0:
                for cs in range(0, cascade_splits):
                    idx = (cs * cascade_stride + seq) * (NUM_KV_HEADS * GROUP) + head
                    m_c = tl.load(cascade_ml_ptr + idx * 2, mask=row_ok, other=float("-inf"))
                    l_c = tl.load(cascade_ml_ptr + idx * 2 + 1, mask=row_ok, other=0.0)
                    acc_c = tl.load(
                        cascade_acc_ptr + idx[:, None] * HEAD_DIM_P + offs_d[None, :], mask=row_ok[:, None], other=0.0
                    )
                    m_i, l_i, acc = _merge_step(m_i, l_i, acc, m_c, l_c, acc_c)

    if SPLIT:
        part = ((s_idx * n_qblocks + qb) * NUM_KV_HEADS + kvh) * num_splits + split
        tl.store(
            part_acc_ptr + (part * BLOCK_M + rows)[:, None] * HEAD_DIM_P + offs_d[None, :],
            acc,
            mask=row_ok[:, None],
        )
        tl.store(part_ml_ptr + (part * BLOCK_M + rows) * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + (part * BLOCK_M + rows) * 2 + 1, l_i, mask=row_ok)
        if FUSE_MERGE:
            group_id = (s_idx * n_qblocks + qb) * NUM_KV_HEADS + kvh
            tl.debug_barrier()  # every thread's partial is stored before the arrival is counted
            if SPLIT_TILES > 0:
                arrivals = tl.cdiv(num_tiles, SPLIT_TILES)  # the non-empty chunks, folded in order
            else:
                arrivals = num_splits
            arrived = tl.atomic_add(counters_ptr + group_id, 1, sem="acq_rel", scope="gpu")
            if arrived == arrivals - 1:
                _merge_splits(
                    out_ptr, part_acc_ptr, part_ml_ptr, group_id * num_splits, arrivals, q_start, tok, head, row_ok,
                    rows, stride_ot, stride_oh, HEAD_DIM, HEAD_DIM_P, BLOCK_M, SPLIT_TILES > 0,
                )  # fmt: skip
                tl.store(counters_ptr + group_id, 0)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit(do_not_specialize=COMBINE_UNSPECIALIZED)
def _combine_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    query_start_ptr,
    seq_ids_ptr,
    num_splits,
    n_qblocks,
    stride_ot,
    stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_SEQ_IDS: tl.constexpr,
    SEQUENTIAL: tl.constexpr = False,
):
    """Merge the splits of one (sequence, query block, KV head): rescale each partial by
    2^(m_s - max m) and divide by the rescaled sum of l (SEQUENTIAL: see _merge_splits)."""
    s_idx = tl.program_id(0)
    qb = tl.program_id(1)
    kvh = tl.program_id(2)
    if USE_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + s_idx).to(tl.int64)
    else:
        seq = s_idx.to(tl.int64)
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_P
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + rows // GROUP_P
    hg = rows % GROUP_P
    row_ok = (tok < q_len) & (hg < GROUP)
    head = kvh * GROUP + hg
    base = ((s_idx * n_qblocks + qb) * NUM_KV_HEADS + kvh) * num_splits
    _merge_splits(
        out_ptr, part_acc_ptr, part_ml_ptr, base, num_splits, q_start, tok, head, row_ok,
        rows, stride_ot, stride_oh, HEAD_DIM, HEAD_DIM_P, BLOCK_M, SEQUENTIAL,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    num_seqs: int,
    n_qblocks: int,
    seq_ids: torch.Tensor | None,
    num_splits: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    counters: torch.Tensor | None = None,
    prefetch: bool = False,
    split_tiles: int = 0,
    cascade: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    flat_walk: bool = False,
    skip_masks: bool = True,
) -> None:
    """Launch the paged kernel over `num_seqs` sequences (all of them, or those in seq_ids),
    each with up to n_qblocks query blocks of block_m rows, its key range cut into num_splits.

    q/out [T, H, D] (last dim contiguous); caches [num_blocks, page, kv_heads, D]. `counters`:
    a zeroed int32 scratch tensor (kept zero between launches by the kernel); when given and
    large enough, split launches merge their partials in the same launch (no second kernel).
    split_tiles > 0 (deterministic mode): split s covers key tiles [s * split_tiles, (s + 1) *
    split_tiles) counted from position 0; with num_splits > 1 each program does one chunk and the
    merge folds the partials in chunk order (num_splits must then cover the longest context of
    the launch; extra splits are empty, exact no-ops); with num_splits == 1 each program walks
    every chunk and folds them the same way (the same bits, no partials); flat_walk does that
    walk in one loop over the tiles, folding at each chunk's last tile (same bits again).
    cascade (decode launches): (row_prefix [B], prefix partial acc, prefix partial (m, l),
    prefix splits) from cascade_prefix_attention: each sequence skips its first row_prefix keys
    and folds those partials in instead.
    """
    T, H, D = q.shape
    _, page, kvh, _ = k_cache.shape
    group = H // kvh
    group_p = triton.next_power_of_2(group)
    head_dim_p = triton.next_power_of_2(D)
    if num_seqs == 0 or T == 0:
        return
    split = num_splits > 1
    if split:
        n_parts = num_seqs * n_qblocks * kvh * num_splits
        part_acc = torch.empty(n_parts * block_m * head_dim_p, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(n_parts * block_m * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    fuse = split and counters is not None and counters.numel() >= num_seqs * n_qblocks * kvh
    if counters is None:
        counters = seq_lens  # unused without FUSE_MERGE
    ids = seq_ids if seq_ids is not None else seq_lens  # unused when USE_SEQ_IDS is False
    if cascade is not None:
        cascade_len, cascade_acc, cascade_ml, cascade_splits = cascade
        cascade_stride = seq_lens.shape[0]
    else:  # unused without CASCADE
        cascade_len, cascade_acc, cascade_ml, cascade_splits, cascade_stride = seq_lens, out, out, 0, 0
    grid = (num_seqs, n_qblocks, kvh * num_splits)
    _launch_attention(
        grid,
        (
            q, k_cache, v_cache, out, part_acc, part_ml, counters, block_tables, seq_lens, query_start_loc, ids,
            cascade_len, cascade_acc, cascade_ml, scale * 1.4426950408889634, num_splits, n_qblocks,
            cascade_splits, cascade_stride,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        ),
        dict(
            NUM_KV_HEADS=kvh, GROUP=group, GROUP_P=group_p, HEAD_DIM=D, HEAD_DIM_P=head_dim_p, PAGE=page,
            BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split, FUSE_MERGE=fuse, PREFETCH=prefetch, USE_SEQ_IDS=seq_ids is not None,
            IEEE=q.dtype == torch.float32, SPLIT_TILES=split_tiles, FLAT_WALK=flat_walk,
            CASCADE=cascade is not None, SKIP_MASKS=skip_masks,
        ),
        num_warps, num_stages,
    )  # fmt: skip
    if split and not fuse:
        _launch_combine(
            (num_seqs, n_qblocks, kvh),
            (out, part_acc, part_ml, query_start_loc, ids, num_splits, n_qblocks, out.stride(0), out.stride(1)),
            dict(
                NUM_KV_HEADS=kvh, GROUP=group, GROUP_P=group_p, HEAD_DIM=D, HEAD_DIM_P=head_dim_p,
                BLOCK_M=block_m, USE_SEQ_IDS=seq_ids is not None, SEQUENTIAL=split_tiles > 0,
            ),
            4,
        )  # fmt: skip


_launch_attention = _Launcher(_paged_attention_kernel, ATTENTION_UNSPECIALIZED)


CASCADE_UNSPECIALIZED = ("num_splits", "part_stride", "stride_bt", "num_items")


@triton.jit(do_not_specialize=CASCADE_UNSPECIALIZED)
def _cascade_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_acc_ptr, part_ml_ptr, block_tables_ptr, query_start_ptr,
    chunk_rows_ptr, chunk_prefix_ptr, chunk_leader_ptr, scale_log2e, num_splits, part_stride, num_items,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, PAGE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Work items (chunk, KV head, split): one chunk of a cascade group (up to ROWS decode rows
    sharing a prefix), one KV head, one slice (split) of the shared prefix's key tiles. The
    chunk's rows x the GROUP query heads of the KV head are the tile's query rows, so each prefix
    K/V tile is loaded once for all of them (the point of cascade attention); no mask: every
    prefix key precedes every query. Writes the unnormalized partial (acc, max, sum) of each
    (row, head) for the split, at [(split * part_stride + row) * heads + head]; the paged
    kernel's CASCADE variant folds them in.

    Persistent: the launch has at most ~2 programs per SM, each walking items pid, pid + G, ...
    of the num_items slots; a chunk slot with prefix 0 (unused in a CUDA graph's fixed capacity)
    costs one load. So a step that shares nothing pays about one wave of near-empty programs,
    not capacity x heads x splits of them (each holding a whole tile's shared memory)."""
    n_programs = tl.num_programs(0)
    per_chunk = NUM_KV_HEADS * num_splits
    BLOCK_M: tl.constexpr = ROWS * GROUP_P
    rows = tl.arange(0, BLOCK_M)
    hg = rows % GROUP_P
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    for w in range(tl.program_id(0), num_items, n_programs):
        c = w // per_chunk
        kvh = (w % per_chunk) // num_splits
        split = w % num_splits
        prefix = tl.load(chunk_prefix_ptr + c)
        if prefix > 0:
            seq = tl.load(chunk_rows_ptr + c * ROWS + rows // GROUP_P)
            row_ok = (seq >= 0) & (hg < GROUP)
            seq = tl.where(seq >= 0, seq, 0).to(tl.int64)
            tok = tl.load(query_start_ptr + seq)  # a decode row's one query token
            head = kvh * GROUP + hg
            q = tl.load(
                q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            bt_row = block_tables_ptr + tl.load(chunk_leader_ptr + c).to(tl.int64) * stride_bt
            num_tiles = tl.cdiv(prefix, BLOCK_N)
            per_split = tl.cdiv(num_tiles, num_splits)
            t_begin = split * per_split
            t_end = tl.minimum(t_begin + per_split, num_tiles)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
            # the first tile's page ids (_walk_tiles loads each next one a tile ahead)
            first, first_ok = _tile_keys(t_begin, 0, prefix, BLOCK_N)
            blk_next = _tile_pages(bt_row, first, first_ok, PAGE)
            # No causal mask (every prefix key precedes every query; q_pos is not read). One
            # masked loop: split at the last tile (where the prefix may end) it ran 4% slower.
            m_i, l_i, acc, blk_next = _walk_tiles(
                q, k_cache_ptr, v_cache_ptr, bt_row, kvh, 0, t_begin, t_end, 0, prefix, scale_log2e, m_i, l_i, acc,
                blk_next, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, offs_d, d_ok,
                HEAD_DIM, HEAD_DIM_P, PAGE, BLOCK_N, IEEE, True, False, True,
            )  # fmt: skip
            idx = (split * part_stride + seq) * (NUM_KV_HEADS * GROUP) + head
            tl.store(part_acc_ptr + idx[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + idx * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + idx * 2 + 1, l_i, mask=row_ok)


def cascade_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    chunk_rows: torch.Tensor,
    chunk_prefix: torch.Tensor,
    chunk_leader: torch.Tensor,
    *,
    num_seqs: int,
    capacity: int,
    rows_per_chunk: int,
    num_splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-prefix half of cascade attention over `capacity` chunks (see model/cascade.py):
    returns the partials (acc [splits * num_seqs * H * D_P], (m, l) [.. * 2]) that
    paged_attention(cascade=...) folds in. Rows outside every chunk are left unwritten (their
    row_prefix is 0, so nothing reads them)."""
    T, H, D = q.shape
    _, page, kvh, _ = k_cache.shape
    group = H // kvh
    head_dim_p = triton.next_power_of_2(D)
    n = num_splits * num_seqs * H
    part_acc = torch.empty(n * head_dim_p, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(n * 2, dtype=torch.float32, device=q.device)
    num_items = capacity * kvh * num_splits
    programs = min(num_items, CASCADE_PROGRAMS_PER_SM * _sm_count(q.device))
    _launch_cascade(
        (programs,),
        (
            q, k_cache, v_cache, part_acc, part_ml, block_tables, query_start_loc, chunk_rows, chunk_prefix,
            chunk_leader, scale * 1.4426950408889634, num_splits, num_seqs, num_items, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        ),
        dict(
            NUM_KV_HEADS=kvh, GROUP=group, GROUP_P=triton.next_power_of_2(group), HEAD_DIM=D,
            HEAD_DIM_P=head_dim_p, PAGE=page, ROWS=rows_per_chunk, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        ),
        num_warps, num_stages,
    )  # fmt: skip
    return part_acc, part_ml


_launch_cascade = _Launcher(_cascade_prefix_kernel, CASCADE_UNSPECIALIZED)
# Persistent programs of the cascade prefix launch per SM (a tile's K/V stages take most of an
# SM's shared memory, so more would only queue).
CASCADE_PROGRAMS_PER_SM = 2


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # TRITON_INTERPRET on CPU: few programs, so each walks several items
_launch_combine = _Launcher(_combine_splits_kernel, COMBINE_UNSPECIALIZED)


# ---- KV write, RoPE --------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    KV_HEADS: tl.constexpr, KV_HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):  # fmt: skip
    """One token's K and V into its slot; a negative slot (CUDA-graph padding) writes nothing."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, KV_HEADS_P)
    d = tl.arange(0, HEAD_DIM_P)
    mask = (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    dst = slot * stride_cs + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k/v [T, kv_heads, D] (last dim contiguous) into caches [num_blocks, page, kv_heads, D]."""
    T, kvh, D = k.shape
    if T == 0:
        return
    _launch_write_kv(
        (T,),
        (k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2)),
        dict(KV_HEADS=kvh, KV_HEADS_P=triton.next_power_of_2(kvh), HEAD_DIM=D, HEAD_DIM_P=triton.next_power_of_2(D)),
        1 if kvh * D <= 1024 else 4,
    )


_launch_write_kv = _Launcher(_write_kv_kernel)


@triton.jit
def _rope_heads(x_ptr, base, stride_h, cos, sin, NH: tl.constexpr, NH_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    """Rotate NH heads of one token in place (HF rotate-half layout); returns the rotated halves.

    Each product and the sum are rounded to the tensor's dtype, as torch computes
    x1*cos - x2*sin elementwise in that dtype."""
    h = tl.arange(0, NH_P)
    d = tl.arange(0, HALF_P)
    mask = (h < NH)[:, None] & (d < HALF)[None, :]
    ptr1 = x_ptr + base + h[:, None] * stride_h + d[None, :]
    dt = x_ptr.dtype.element_ty
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    a = (x1 * c).to(dt).to(tl.float32)
    b = (x2 * s).to(dt).to(tl.float32)
    o1 = (a - b).to(dt)
    a2 = (x2 * c).to(dt).to(tl.float32)
    b2 = (x1 * s).to(dt).to(tl.float32)
    o2 = (a2 + b2).to(dt)
    tl.store(ptr1, o1, mask=mask)
    tl.store(ptr1 + HALF, o2, mask=mask)
    return o1, o2, h, d, mask


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_HEADS_P: tl.constexpr, KV_HEADS: tl.constexpr, KV_HEADS_P: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr,
):  # fmt: skip
    """One token: rotate q and k in place, then store k and v at the token's slot."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dd = tl.arange(0, HALF_P)
    dmask = dd < HALF
    dt = q_ptr.dtype.element_ty
    # The reference rounds the fp32 cos/sin table to the model dtype before multiplying.
    cos = tl.load(cos_ptr + pos * HALF + dd, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + dd, mask=dmask, other=0.0).to(dt).to(tl.float32)
    _rope_heads(q_ptr, t * stride_qt, stride_qh, cos, sin, NUM_HEADS, NUM_HEADS_P, HALF, HALF_P)
    k1, k2, h, d, mask = _rope_heads(k_ptr, t * stride_kt, stride_kh, cos, sin, KV_HEADS, KV_HEADS_P, HALF, HALF_P)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = k_cache_ptr + slot * stride_cs + h[:, None] * stride_ch + d[None, :]
        ct = k_cache_ptr.dtype.element_ty
        tl.store(dst, k1.to(ct), mask=mask)
        tl.store(dst + HALF, k2.to(ct), mask=mask)
        vsrc = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
        vdst = v_cache_ptr + slot * stride_cs + h[:, None] * stride_ch + d[None, :]
        tl.store(vdst, tl.load(vsrc, mask=mask).to(ct), mask=mask)
        tl.store(vdst + HALF, tl.load(vsrc + HALF, mask=mask).to(ct), mask=mask)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """RoPE on q [T, H, D] and k [T, KV, D] in place, then k/v into the cache at `slots`.

    cos/sin tables: fp32 [max_positions, D/2], contiguous. q/k/v may be strided views of the
    fused qkv projection (the head and dim strides must be D and 1)."""
    T, H, D = q.shape
    kvh = k.shape[1]
    if T == 0:
        return
    half = D // 2
    _launch_rope(
        (T,),
        (
            q, k, v, cos_table, sin_table, positions, slots, k_cache, v_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(1), k_cache.stride(2),
        ),
        dict(
            NUM_HEADS=H, NUM_HEADS_P=triton.next_power_of_2(H), KV_HEADS=kvh, KV_HEADS_P=triton.next_power_of_2(kvh),
            HALF=half, HALF_P=triton.next_power_of_2(half),
        ),
        4,
    )  # fmt: skip


_launch_rope = _Launcher(_rope_write_kv_kernel)


# ---- norms and the MLP activation -------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    ADD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = w * (x / rms(x)) with HF's rounding; with ADD, x = res + x first (rounded to the
    dtype and written back to res_out, the new residual stream)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(dt)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.rsqrt(var + eps)).to(dt)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(dt)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


_launch_norm = _Launcher(_rms_norm_kernel)


def _norm_warps(n: int) -> int:
    return 8 if n >= 4096 else 4 if n >= 1024 else 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [T, N] (rows contiguous) -> new tensor."""
    T, N = x.shape
    out = torch.empty_like(x)
    if T:
        block = triton.next_power_of_2(N)
        _launch_norm(
            (T,),
            (x, x, weight, out, out, x.stride(0), x.stride(0), out.stride(0), out.stride(0), N, eps),
            dict(ADD=False, BLOCK=block),
            _norm_warps(block),
        )
    return out


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_residual, normed): new_residual = residual + delta, normed = RMSNorm(new_residual)."""
    T, N = residual.shape
    out = torch.empty_like(residual)
    new_res = torch.empty_like(residual)
    if T:
        block = triton.next_power_of_2(N)
        _launch_norm(
            (T,),
            (delta, residual, weight, out, new_res, delta.stride(0), residual.stride(0), out.stride(0), new_res.stride(0), N, eps),
            dict(ADD=True, BLOCK=block),
            _norm_warps(block),
        )
    return new_res, out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    """out = silu(gate) * up for x = [gate | up], each op rounded to the dtype like torch's."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = x_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(dt), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
    T, two_i = x.shape
    n = two_i // 2
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    if T:
        block = 1024
        _launch_silu_mul((T, triton.cdiv(n, block)), (x, out, x.stride(0), out.stride(0), n), dict(BLOCK=block), 4)
    return out


_launch_silu_mul = _Launcher(_silu_mul_kernel)

"""Batch-invariant ops for deterministic mode (`ModelConfig.deterministic`), torch (CPU) flavour.

A token's logits must come out bit for bit the same whatever else shares its step: how many
rows the step has, whether its prompt prefix came from the cache (at any block boundary), how
the prompt was chunked, whether it was preempted and recomputed. Floating-point addition is not
associative, so that holds only if every reduction a row goes through is done in an order that
depends on that row alone. What breaks it in the default mode, measured on CPU fp32 with the
embedded model (bench/bench_deterministic_cpu.py):

- matmuls: MKL takes another kernel for a 1-3 row input than for 4+ rows, so a decode row
  differs from the same row inside a prefill in the last bits (rows >= 4 agree at any M);
- attention: a fresh prefill runs SDPA's flash kernel over the new K/V, a prefill over a cached
  prefix SDPA with an explicit mask over the gathered K/V, a decode one padded batched SDPA:
  three reduction orders over the keys.

The fixes, each used only in deterministic mode:

- `linear`: the rows are cut into fixed tiles of ROW_TILE rows (the last one padded with zeros)
  and multiplied as one batched matmul of identical [ROW_TILE, in] x [in, out] problems, so a
  row is always reduced by the same kernel in the same order, whatever M is.
- `attend`: one attention computation for prefill (fresh or over a cached prefix) and decode.
  Queries go in tiles of Q_TILE tokens (times the query heads of one KV head); keys in chunks of
  KV_CHUNK_BLOCKS blocks counted from position 0, read from the paged pool. Each chunk is one
  fixed-shape score matmul, an online-softmax update and a fixed-shape P @ V matmul, chunks in
  order from position 0. A chunk a query cannot see (all masked) is an exact no-op (scale by 1,
  add 0), so a query's result never depends on how far its tile's other queries reach.
- RMSNorm, RoPE, SiLU, residual adds are row-wise already (measured: bitwise equal at any row
  count); sampling is per request (greedy argmax per row; seeded requests own their generator).

What this rests on (checked by tests/model/test_batch_invariant.py and
tests/engine/test_deterministic.py on the machine they run on): a fixed-shape BLAS matmul reduces
each row the same way whatever the other rows hold, and elementwise ops give an element the same
bits wherever it falls in a tensor (measured for exp with torch 2.13: an element exp'd alone, at a
thread's tail or inside a vector body comes out the same). The logits do depend on the thread
count (MKL's blocking), so compare runs made with the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows per matmul tile: the smallest tile MKL runs with its main (4+ row) kernel on the CI CPU.
# Bigger tiles pad decode steps more; smaller ones would hit the small-M kernels.
ROW_TILE = 16
# Query tokens per attention tile, and KV blocks per key chunk (counted from position 0).
Q_TILE = 16
KV_CHUNK_BLOCKS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias) with each row's result independent of M: the rows
    run as ceil(M / ROW_TILE) identical [ROW_TILE, in] matmuls (one batched call)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    m, k = x.shape
    tiles = -(-m // ROW_TILE)
    padded = x.new_zeros(tiles * ROW_TILE, k)
    padded[:m] = x
    out = torch.bmm(padded.view(tiles, ROW_TILE, k), weight.t().expand(tiles, k, weight.shape[0]))
    out = out.view(tiles * ROW_TILE, -1)[:m]
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, -1)


@dataclass(slots=True)
class _AttentionPlan:
    """Per-step tiling, shared by every layer: query tiles sorted by the number of key chunks
    they need (most first), so chunk c is computed for a prefix of the tiles."""

    q_rows: torch.Tensor  # [tiles * Q_TILE] token row of each tile slot (padding repeats a real row)
    q_pos: torch.Tensor  # [tiles, 1, Q_TILE * group, 1] position of each query row
    out_rows: torch.Tensor  # [real tokens] tile slot of each token row 0..T-1
    active: list[int]  # active[c]: tiles that need key chunk c
    chunk_blocks: list[torch.Tensor]  # chunk_blocks[c]: [active[c] * KV_CHUNK_BLOCKS] block ids
    key_pos: list[torch.Tensor]  # key_pos[c]: [chunk tokens] positions of chunk c's keys


def _plan(meta, block_size: int, group: int, device: torch.device) -> _AttentionPlan:
    chunk = KV_CHUNK_BLOCKS * block_size
    tiles = []  # (chunks needed, seq, first token row, tokens, first position)
    row = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens, meta.seq_lens_list)):
        ctx = slen - qlen
        for start in range(0, qlen, Q_TILE):
            n = min(Q_TILE, qlen - start)
            last_pos = ctx + start + n - 1
            tiles.append((-(-(last_pos + 1) // chunk), i, row + start, n, ctx + start))
        row += qlen
    tiles.sort(key=lambda t: -t[0])
    q_rows, q_pos, out_rows = [], [], [0] * row
    for slot_tile, (_, _, first_row, n, first_pos) in enumerate(tiles):
        for j in range(Q_TILE):
            jj = min(j, n - 1)  # padding slots repeat the last real token (results dropped)
            q_rows.append(first_row + jj)
            q_pos.extend([first_pos + jj] * group)
            if j < n:
                out_rows[first_row + j] = slot_tile * Q_TILE + j
    tables = meta.block_tables.tolist()
    max_chunks = tiles[0][0] if tiles else 0
    active, chunk_blocks, key_pos = [], [], []
    for c in range(max_chunks):
        a = sum(1 for t in tiles if t[0] > c)
        ids = []
        for t in tiles[:a]:
            table = tables[t[1]]
            for b in range(c * KV_CHUNK_BLOCKS, (c + 1) * KV_CHUNK_BLOCKS):
                # past the sequence's table: block 0, whose keys sit at positions nobody sees yet
                ids.append(int(table[b]) if b < len(table) else 0)
        active.append(a)
        chunk_blocks.append(torch.tensor(ids, dtype=torch.long, device=device))
        key_pos.append(torch.arange(c * chunk, (c + 1) * chunk, device=device))
    return _AttentionPlan(
        q_rows=torch.tensor(q_rows, dtype=torch.long, device=device),
        q_pos=torch.tensor(q_pos, dtype=torch.long, device=device).view(len(tiles), 1, Q_TILE * group, 1),
        out_rows=torch.tensor(out_rows, dtype=torch.long, device=device),
        active=active,
        chunk_blocks=chunk_blocks,
        key_pos=key_pos,
    )


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """Causal attention of the step's new tokens (their K/V already written to the pool) over
    their sequences' paged context -> [T, H, D]; see the module docstring for the order."""
    T, H, D = q.shape
    _, block_size, kvh, _ = k_cache.shape
    group = H // kvh
    # The table's Python lists are needed on the host: build them once per step (every layer
    # reads the same plan). Block tables are padded with 0 beyond each sequence's blocks.
    plan = meta.backend_state.get("invariant")
    if plan is None:
        plan = _plan(meta, block_size, group, q.device)
        meta.backend_state["invariant"] = plan
    tiles = plan.q_pos.shape[0]
    rows = Q_TILE * group
    chunk = KV_CHUNK_BLOCKS * block_size
    # [tiles, Q_TILE, H, D] -> [tiles, kvh, Q_TILE * group, D]: a tile's rows are its tokens
    # times the query heads that share one KV head.
    qt = q.index_select(0, plan.q_rows).view(tiles, Q_TILE, kvh, group, D).permute(0, 2, 1, 3, 4)
    qt = qt.reshape(tiles, kvh, rows, D)
    m = torch.full((tiles, kvh, rows), float("-inf"), dtype=torch.float32, device=q.device)
    l_sum = torch.zeros(tiles, kvh, rows, dtype=torch.float32, device=q.device)
    acc = torch.zeros(tiles, kvh, rows, D, dtype=torch.float32, device=q.device)
    for c, a in enumerate(plan.active):
        blocks = plan.chunk_blocks[c]
        keys = k_cache.index_select(0, blocks).view(a, chunk, kvh, D).permute(0, 2, 3, 1)  # [a, kvh, D, chunk]
        values = v_cache.index_select(0, blocks).view(a, chunk, kvh, D).transpose(1, 2)  # [a, kvh, chunk, D]
        scores = torch.matmul(qt[:a], keys).float() * scale  # [a, kvh, rows, chunk]
        hidden = plan.key_pos[c].view(1, 1, 1, chunk) > plan.q_pos[:a]
        scores = scores.masked_fill(hidden, float("-inf"))
        m_new = torch.maximum(m[:a], scores.amax(-1))
        alpha = torch.exp(m[:a] - m_new)
        p = torch.exp(scores - m_new.unsqueeze(-1))
        l_sum[:a] = l_sum[:a] * alpha + p.sum(-1)
        acc[:a] = acc[:a] * alpha.unsqueeze(-1) + torch.matmul(p.to(values.dtype), values).float()
        m[:a] = m_new
    out = (acc / l_sum.unsqueeze(-1)).to(q.dtype)  # [tiles, kvh, rows, D]
    out = out.view(tiles, kvh, Q_TILE, group, D).permute(0, 2, 1, 3, 4).reshape(tiles * Q_TILE, H, D)
    return out.index_select(0, plan.out_rows)

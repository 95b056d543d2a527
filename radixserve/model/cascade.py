"""Cascade (shared-prefix) attention for decode rows: which rows share a cached prefix.

The radix tree makes requests that start with the same tokens point at the SAME physical KV
blocks. A decode row reads its whole context every step, so 16 rows over one 2048-token prefix
read that prefix 16 times. Cascade attention reads it once per group instead:

    attention(row) = merge( attention(the group's queries, the shared prefix, no mask),
                            attention(the row's query, the rest of its own context) )

with the usual log-sum-exp merge of two partial softmaxes (the same arithmetic as the split-key
merge). The GPU kernels are in triton_kernels.py (`cascade_prefix_attention` and the CASCADE
variant of the paged kernel); this module only finds the groups, on the host, from the block
tables, vectorised over rows (no Python loop over blocks): a decode step has up to hundreds of
rows and this runs on the critical path of every step.

Grouping: two rows whose tables hold the same physical block at column c share columns 0..c
(a block's id names one radix-tree node, and a node has one path from the root). So rows are
grouped by their block at column `min_blocks - 1`, and each group's shared prefix is the longest
run of columns where every row equals the group's first row (its leader), capped so that the
shared blocks are full and strictly before each row's newest token (the block being written is
private to the row). Groups of one row take the plain path.

A group is cut into chunks of at most `rows_per_chunk` rows: one chunk's queries (rows x the
query heads of one KV head) make one tile of the prefix kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A shared prefix shorter than this many blocks (x 16 tokens) is read per row: the prefix
# kernel's launch and the merge cost more than the bytes they save.
CASCADE_MIN_BLOCKS = 16
# Rows per chunk (per prefix-kernel tile): 16 rows x 4 query heads (Llama-3 GQA) = 64 query rows.
CASCADE_ROWS = 16
# A group of fewer rows is read per row. Plain decode already gets a group's prefix from L2 when
# its rows run side by side, so the cascade wins only where one read serves several rows (H200,
# one 8B layer over 2048-token prefixes, bench/bench_cascade_gpu.py, persistent prefix kernel):
# 128 rows in groups of 16 1.94x, of 4 1.24x; 32 rows in groups of 8 1.33x. Groups of 2-3 were
# not measured.
CASCADE_MIN_ROWS = 4


@dataclass(slots=True)
class CascadePlan:
    """Host arrays of one step's cascade, every entry indexed by the step's sequence index.

    row_prefix[i]: tokens of sequence i's context that the prefix kernel covers (0: none; then
    the plain path reads all of it). Chunk c: rows chunk_rows[c] (-1 padded), a shared prefix of
    chunk_prefix[c] tokens read through the block table of sequence chunk_leader[c]."""

    row_prefix: np.ndarray  # [B] int64
    chunk_rows: np.ndarray  # [C, rows_per_chunk] int64, -1 padded
    chunk_prefix: np.ndarray  # [C] int64
    chunk_leader: np.ndarray  # [C] int64

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_prefix.shape[0])

    @property
    def shared_rows(self) -> int:
        return int(np.count_nonzero(self.row_prefix))


def max_chunks(num_rows: int, rows_per_chunk: int = CASCADE_ROWS, min_rows: int = CASCADE_MIN_ROWS) -> int:
    """An upper bound on the chunks of `num_rows` rows (groups have >= min_rows rows): the fixed
    grid of a CUDA graph's prefix launch."""
    return max(1, num_rows // max(2, min_rows) + num_rows // rows_per_chunk + 1)


def plan_cascade(
    tables: np.ndarray,
    seq_lens: np.ndarray,
    block_size: int,
    rows: np.ndarray | None = None,
    min_blocks: int = CASCADE_MIN_BLOCKS,
    rows_per_chunk: int = CASCADE_ROWS,
    min_rows: int = CASCADE_MIN_ROWS,
) -> CascadePlan | None:
    """The cascade of a step whose sequences have block tables `tables` [B, W] (entries past a
    row's blocks are ignored) and contexts of `seq_lens` [B] tokens (including the newest one);
    only the sequences in `rows` (default: all) are candidates: decode rows, one query token
    each. None when no `min_rows` rows share >= min_blocks full blocks."""
    num_seqs = tables.shape[0]
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    # Full blocks strictly before the newest token: the most a row may share.
    full = (seq_lens - 1) // block_size
    candidates = np.arange(num_seqs) if rows is None else np.asarray(rows, dtype=np.int64)
    candidates = candidates[full[candidates] >= min_blocks]
    min_rows = max(2, min_rows)
    if candidates.shape[0] < min_rows:
        return None
    key = tables[candidates, min_blocks - 1]
    order = np.argsort(key, kind="stable")
    idx = candidates[order]
    key = key[order]
    new_group = np.empty(idx.shape[0], dtype=bool)
    new_group[0] = True
    np.not_equal(key[1:], key[:-1], out=new_group[1:])
    group = np.cumsum(new_group) - 1  # each row's group, 0..G-1
    starts = np.flatnonzero(new_group)
    sizes = np.bincount(group)
    if sizes.max() < min_rows:  # every row alone or in a small group: the common case
        return None
    leaders = idx[starts]
    width = int(full[idx].max())
    same = tables[idx, :width] == tables[leaders[group], :width]
    # Columns equal to the leader's, counted from 0 (all of them when the row matches to the end).
    common = np.where(same.all(axis=1), width, np.argmin(same, axis=1))
    common = np.minimum(common, full[idx])
    group_prefix = np.minimum.reduceat(common, starts) * block_size
    # Every row of a kept group shares >= min_blocks blocks (the same block at column min_blocks - 1).
    kept_row = (sizes >= min_rows)[group]
    row_prefix = np.zeros(num_seqs, dtype=np.int64)
    row_prefix[idx[kept_row]] = group_prefix[group[kept_row]]
    # Chunks: each group's rows in runs of rows_per_chunk, numbered group after group.
    chunks_per_group = np.where(sizes >= min_rows, -(-sizes // rows_per_chunk), 0)
    first_chunk = np.cumsum(chunks_per_group) - chunks_per_group
    pos = np.arange(idx.shape[0]) - starts[group]
    chunk = first_chunk[group] + pos // rows_per_chunk
    num_chunks = int(chunks_per_group.sum())
    chunk_rows = np.full((num_chunks, rows_per_chunk), -1, dtype=np.int64)
    chunk_rows[chunk[kept_row], (pos % rows_per_chunk)[kept_row]] = idx[kept_row]
    return CascadePlan(
        row_prefix,
        chunk_rows,
        np.repeat(group_prefix, chunks_per_group).astype(np.int64),
        np.repeat(leaders, chunks_per_group).astype(np.int64),
    )


@dataclass(slots=True)
class CascadeMetadata:
    """A step's cascade on the device, as the attention backend reads it. In a CUDA graph the
    tensors are fixed-size views of the graph's static buffer (`capacity` chunks, unused ones
    with prefix 0: their programs exit at once) refilled before each replay."""

    row_prefix: torch.Tensor  # [B] long
    chunk_rows: torch.Tensor  # [capacity * rows_per_chunk] long, -1 padded
    chunk_prefix: torch.Tensor  # [capacity] long
    chunk_leader: torch.Tensor  # [capacity] long
    capacity: int
    rows_per_chunk: int = CASCADE_ROWS

    @classmethod
    def from_plan(cls, plan: CascadePlan, device: torch.device | str) -> CascadeMetadata:
        """Plain device tensors of a plan (tests, benchmarks; the runner packs them into its
        one upload instead)."""
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a).reshape(-1)).to(device)

        return cls(t(plan.row_prefix), t(plan.chunk_rows), t(plan.chunk_prefix), t(plan.chunk_leader),
                   plan.num_chunks, plan.chunk_rows.shape[1])  # fmt: skip

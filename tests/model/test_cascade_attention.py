"""Cascade (shared-prefix) attention: the grouping on the host, and the Triton kernels against
plain paged attention and the torch reference on paged KV where decode rows share prefix blocks.

The grouping tests are pure numpy (they run everywhere). The kernel tests skip without Triton
and a CUDA device (CI); with TRITON_INTERPRET=1 they run on CPU in float32 with tiny shapes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from radixserve.model.cascade import CascadeMetadata, max_chunks, plan_cascade


def _tables(rows: list[list[int]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), 999, dtype=np.int64)  # 999: stale entries past a row's blocks
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_groups_rows_by_shared_blocks_and_caps_at_full_blocks():
    # rows 0, 2, 3 share blocks 10..13 (row 3 diverges after 12); rows 1 and 4 share 20, 21;
    # row 5 shares nothing. Block size 4.
    rows = [[10, 11, 12, 13, 30], [20, 21, 40], [10, 11, 12, 13, 31, 32], [10, 11, 12, 50], [20, 21, 41], [60, 61, 62]]
    seq_lens = np.array([18, 10, 22, 14, 9, 12])
    plan = plan_cascade(_tables(rows), seq_lens, block_size=4, min_blocks=2, rows_per_chunk=2, min_rows=2)
    assert plan is not None
    # group {0, 2, 3}: 3 common blocks (row 3 diverges at column 3) = 12 tokens
    # group {1, 4}: 2 blocks (row 4 has 9 tokens: 2 full blocks before its newest token)
    assert plan.row_prefix.tolist() == [12, 8, 12, 12, 8, 0]
    chunks = sorted((tuple(r), p, lead) for r, p, lead in zip(plan.chunk_rows.tolist(), plan.chunk_prefix.tolist(), plan.chunk_leader.tolist()))
    assert chunks == [((0, 2), 12, 0), ((1, 4), 8, 1), ((3, -1), 12, 0)]
    assert plan.num_chunks <= max_chunks(6, 2, 2)


def test_newest_token_block_is_never_shared():
    # both rows hold block 7 at column 1, but the newest token of row 0 (position 7) is in it
    plan = plan_cascade(_tables([[5, 7], [5, 7, 8]]), np.array([8, 12]), block_size=4, min_blocks=1, min_rows=2)
    assert plan.row_prefix.tolist() == [4, 4]


def test_nothing_shared_or_too_short_is_none():
    assert plan_cascade(_tables([[1, 2, 3], [4, 5, 6]]), np.array([12, 12]), 4, min_blocks=1, min_rows=2) is None
    assert plan_cascade(_tables([[1, 2, 3], [1, 2, 6]]), np.array([12, 12]), 4, min_blocks=3, min_rows=2) is None
    assert plan_cascade(_tables([[1, 2, 3]]), np.array([12]), 4, min_blocks=1, min_rows=2) is None


def test_groups_smaller_than_min_rows_take_the_plain_path():
    # rows 0-2 share blocks 1, 2; rows 3-4 share 7, 8: with min_rows 3 only the first group counts
    tables = _tables([[1, 2, 3], [1, 2, 4], [1, 2, 5], [7, 8, 9], [7, 8, 10]])
    plan = plan_cascade(tables, np.full(5, 12), 4, min_blocks=1, min_rows=3)
    assert plan.row_prefix.tolist() == [8, 8, 8, 0, 0]
    assert plan.chunk_rows[:, :3].tolist() == [[0, 1, 2]]
    assert plan_cascade(tables, np.full(5, 12), 4, min_blocks=1, min_rows=4) is None


def test_candidates_limit_the_rows():
    tables = _tables([[1, 2, 3], [1, 2, 4], [1, 2, 5]])
    plan = plan_cascade(tables, np.array([12, 12, 12]), 4, rows=np.array([0, 2]), min_blocks=1, min_rows=2)
    assert plan.row_prefix.tolist() == [8, 0, 8]


def test_cli_flag_and_option_turn_it_off():
    import argparse

    from radixserve.commands.common import add_engine_args, engine_config_from_args
    from radixserve.config import EngineConfig

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).model.cascade_attention is True
    assert engine_config_from_args(parser.parse_args(["--no-cascade-attention"])).model.cascade_attention is False
    assert EngineConfig.from_options(cascade_attention=False).model.cascade_attention is False


# ---- kernels -----------------------------------------------------------------------------

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_GPU_PATH = torch.cuda.is_available() or INTERPRET
try:
    import triton  # noqa: F401
except ImportError:
    HAVE_GPU_PATH = False

gpu = pytest.mark.skipif(not HAVE_GPU_PATH, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
TOL = 1e-4 if DTYPE == torch.float32 else 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _shared_setup(groups, own, *, heads, kv_heads, head_dim, block_size, queries=None, seed=0):
    """groups: (shared prefix blocks, rows) each; own[i]: tokens of row i after its group's
    prefix (the newest one included); queries[i]: new tokens of row i (default 1: decode).
    Returns caches, metadata (with the cascade planned) and q."""
    from radixserve.model.attention import AttentionMetadata

    gen = torch.Generator().manual_seed(seed)
    counts = [rows for _, rows in groups]
    n_rows = sum(counts)
    assert len(own) == n_rows
    queries = queries or [1] * n_rows
    need = sum(b for b, _ in groups) + sum(-(-o // block_size) for o in own) + 4
    perm = torch.randperm(need + 5, generator=gen).tolist()
    tables, ctx, row = [], [], 0
    for blocks, rows in groups:
        prefix = [perm.pop() for _ in range(blocks)]
        for _ in range(rows):
            tables.append(prefix + [perm.pop() for _ in range(-(-own[row] // block_size))])
            ctx.append(blocks * block_size + own[row] - queries[row])
            row += 1
    num_blocks = need + 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    meta = AttentionMetadata.build(tables, ctx, queries, block_size, device=DEVICE)
    q = torch.randn(sum(queries), heads, head_dim, generator=gen).to(DTYPE).to(DEVICE)
    return k_cache, v_cache, meta, q


def _plan_into(meta, block_size, min_blocks, rows_per_chunk=4, capacity=None):
    from radixserve.model.attention import padded_block_tables  # noqa: F401

    tables = meta.block_tables.cpu().numpy()
    decode = np.array([i for i, n in enumerate(meta.query_lens) if n == 1])
    plan = plan_cascade(tables, np.array(meta.seq_lens_list), block_size, rows=decode,
                        min_blocks=min_blocks, rows_per_chunk=rows_per_chunk, min_rows=2)  # fmt: skip
    assert plan is not None
    cascade = CascadeMetadata.from_plan(plan, DEVICE)
    if capacity is not None:  # a CUDA graph's fixed grid: unused chunks have prefix 0
        pad = capacity - plan.num_chunks
        cascade = CascadeMetadata(
            cascade.row_prefix,
            torch.cat([cascade.chunk_rows, torch.full((pad * rows_per_chunk,), -1, dtype=torch.long, device=DEVICE)]),
            torch.cat([cascade.chunk_prefix, torch.zeros(pad, dtype=torch.long, device=DEVICE)]),
            torch.cat([cascade.chunk_leader, torch.zeros(pad, dtype=torch.long, device=DEVICE)]),
            capacity, rows_per_chunk,
        )  # fmt: skip
    return plan, cascade


def _attend(meta, k_cache, v_cache, q, cascade_on: bool):
    from radixserve.model.triton_attention import TritonAttentionBackend

    backend = TritonAttentionBackend()
    backend.cascade = cascade_on
    meta.backend_state.clear()
    return backend.attend(q, k_cache, v_cache, meta, q.shape[-1] ** -0.5)


def _reference(meta, k_cache, v_cache, q):
    from radixserve.model.attention import TorchAttentionBackend

    return TorchAttentionBackend().attend(q, k_cache, v_cache, meta, q.shape[-1] ** -0.5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (9, 3, 64), (4, 4, 16)])
@pytest.mark.parametrize("group_rows", [(2,), (5, 3), (9, 1, 2)])
def test_cascade_matches_plain_and_torch(heads, kv_heads, head_dim, group_rows):
    block_size = 4
    groups = [(6 + 3 * g, rows) for g, rows in enumerate(group_rows)]
    n = sum(group_rows)
    own = [1 + (7 * i) % 23 for i in range(n)]  # some rows end inside the first own block
    k_cache, v_cache, meta, q = _shared_setup(groups, own, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                             block_size=block_size)  # fmt: skip
    plain = _attend(meta, k_cache, v_cache, q, cascade_on=False)
    plan, meta.cascade = _plan_into(meta, block_size, min_blocks=2, capacity=max_chunks(n, 4, 2))
    assert plan.shared_rows == sum(r for r in group_rows if r >= 2)
    cascaded = _attend(meta, k_cache, v_cache, q, cascade_on=True)
    assert meta.backend_state["triton"].launches[0].cascade is not None
    ref = _reference(meta, k_cache, v_cache, q)
    assert not cascaded.isnan().any()
    assert _rel(cascaded, plain) < TOL and _rel(cascaded, ref) < TOL


@gpu
@pytest.mark.gpu
def test_runner_turns_cascade_off_in_deterministic_mode():
    import types

    from radixserve.config import CacheConfig
    from radixserve.model.arch import preset
    from radixserve.model.llama import LlamaForCausalLM
    from radixserve.model.triton_attention import TritonAttentionBackend
    from radixserve.runner import ModelRunner

    arch = preset("tiny")
    model = LlamaForCausalLM(arch, TritonAttentionBackend(), dtype=DTYPE, device=DEVICE)
    loaded = types.SimpleNamespace(model=model, arch=arch)
    for deterministic, expected in ((False, True), (True, False)):
        ModelRunner(loaded, CacheConfig(num_blocks=16), 16, cuda_graphs=False, deterministic=deterministic)
        assert model.backend.cascade is expected
    ModelRunner(loaded, CacheConfig(num_blocks=16), 16, cuda_graphs=False, cascade_attention=False)
    assert model.backend.cascade is False


@gpu
@pytest.mark.gpu
def test_cascade_with_split_keys_and_a_mixed_step():
    # Few rows: the suffix launch splits its keys (the fold happens in split 0 only); a prefill
    # chunk in the same step takes the plain path, its rows outside every chunk.
    block_size = 8
    groups = [(40, 3), (1, 1)]
    own = [3, 70, 9, 5]
    queries = [1, 1, 1, 5]
    k_cache, v_cache, meta, q = _shared_setup(groups, own, heads=8, kv_heads=2, head_dim=32, block_size=block_size,
                                             queries=queries)  # fmt: skip
    plan, meta.cascade = _plan_into(meta, block_size, min_blocks=4)
    assert plan.row_prefix.tolist() == [320, 320, 320, 0]
    cascaded = _attend(meta, k_cache, v_cache, q, cascade_on=True)
    launch = meta.backend_state["triton"].launches[0]
    assert launch.cascade is not None and launch.num_splits > 1
    assert _rel(cascaded, _reference(meta, k_cache, v_cache, q)) < TOL

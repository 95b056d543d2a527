"""Paged attention (TorchAttentionBackend) against a dense causal reference."""

from __future__ import annotations

import pytest
import torch

from radixserve.model.arch import preset
from radixserve.model.attention import (
    AttentionMetadata,
    KVCache,
    TorchAttentionBackend,
    dense_causal_attention,
    padded_block_tables,
)
from radixserve.step import StepInput


def _scenario(seqs, *, heads=8, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, seed=0):
    """seqs: list of (context_len, query_len). Returns per-seq full q/k/v and the paged setup.

    The cached context's K/V is written into shuffled blocks first (as an earlier step would
    have), then the step under test writes the new tokens and attends.
    """
    gen = torch.Generator().manual_seed(seed)
    total_blocks = sum((c + q + block_size - 1) // block_size for c, q in seqs)
    num_blocks = total_blocks + 5
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    backend = TorchAttentionBackend()
    full, tables = [], []
    for ctx, qlen in seqs:
        n = ctx + qlen
        q = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        nb = (n + block_size - 1) // block_size
        table = [perm.pop() for _ in range(nb)]
        full.append((q, k, v))
        tables.append(table)
        if ctx:
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
            backend.write_kv(k_cache, v_cache, k[:ctx], v[:ctx], slots)
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [q for _, q in seqs], block_size)
    q_new = torch.cat([q[c:] for (q, _, _), (c, _) in zip(full, seqs)])
    k_new = torch.cat([k[c:] for (_, k, _), (c, _) in zip(full, seqs)])
    v_new = torch.cat([v[c:] for (_, _, v), (c, _) in zip(full, seqs)])
    return backend, k_cache, v_cache, meta, full, (q_new, k_new, v_new)


def _reference(full, seqs, scale):
    return torch.cat(
        [dense_causal_attention(q, k, v, scale)[c:] for (q, k, v), (c, _) in zip(full, seqs)]
    )


MIXED = [
    (0, 7),  # fresh prefill, partial last block
    (8, 5),  # cached prefix (2 full blocks) + chunk
    (13, 1),  # decode, context ends mid-block
    (0, 1),  # one-token prompt
    (5, 11),  # chunk starting mid-block
    (20, 1),  # another decode, longer context
    (3, 1),  # decode, short context (padding in the batched decode)
]


@pytest.mark.parametrize("pass_fresh_kv", [True, False])
def test_paged_matches_dense_mixed_batch(pass_fresh_kv):
    backend, kc, vc, meta, full, (q, k, v) = _scenario(MIXED)
    scale = 16**-0.5
    backend.write_kv(kc, vc, k, v, meta.slot_mapping)
    out = backend.attend(q, kc, vc, meta, scale, k=k if pass_fresh_kv else None, v=v if pass_fresh_kv else None)
    ref = _reference(full, MIXED, scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 33)],  # single prefill
        [(16, 1), (31, 1), (2, 1), (7, 1)],  # all decode, batched
        [(12, 9)],  # one chunk after a cached prefix
    ],
)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_paged_shapes_and_gqa(seqs, heads, kv_heads):
    backend, kc, vc, meta, full, (q, k, v) = _scenario(seqs, heads=heads, kv_heads=kv_heads)
    backend.write_kv(kc, vc, k, v, meta.slot_mapping)
    out = backend.attend(q, kc, vc, meta, 0.3, k=k, v=v)
    torch.testing.assert_close(out, _reference(full, seqs, 0.3), atol=1e-5, rtol=1e-5)


def _long_context_scenario(seqs, heads, kv_heads, head_dim=16, block_size=16, dtype=torch.float32):
    """Like _scenario, but each sequence's table starts with consecutive block ids (what a prompt
    prefilled in one step gets from a fresh pool) and ends with scattered ones (blocks a later
    question took from the free list), as a long cached prompt plus a new question has it."""
    gen = torch.Generator().manual_seed(1)
    sizes = [(c + q + block_size - 1) // block_size for c, q in seqs]
    num_blocks = 2 * sum(sizes) + 8
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    backend = TorchAttentionBackend()
    spare = list(range(sum(sizes) + 4, num_blocks))[::-1]
    full, tables, next_block = [], [], 0
    for (ctx, qlen), nb in zip(seqs, sizes):
        q, k, v = (torch.randn(ctx + qlen, h, head_dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
        run = ctx // block_size
        table = list(range(next_block, next_block + run)) + [spare.pop() for _ in range(nb - run)]
        next_block += run
        slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        backend.write_kv(k_cache, v_cache, k[:ctx], v[:ctx], torch.tensor(slots, dtype=torch.long))
        full.append((q, k, v))
        tables.append(table)
    step = StepInput.build(block_size, ((list(range(q)), c, t, True) for (c, q), t in zip(seqs, tables)))
    meta = AttentionMetadata.from_step(
        step, torch.tensor(step.positions), torch.tensor(step.slot_mapping), torch.tensor(step.query_start_loc),
        torch.tensor(step.seq_lens), torch.from_numpy(padded_block_tables(step)),
    )  # fmt: skip
    new = [torch.cat([t[c:] for t, (c, _) in zip(parts, seqs)]) for parts in zip(*full)]
    return backend, k_cache, v_cache, meta, full, new


# Long cached contexts, each with new tokens that start mid-block or at a block boundary, beside
# a decode and a fresh prefill.
LONG = [(300, 9), (256, 16), (517, 3), (40, 1), (0, 12)]


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_cached_context_matches_dense(heads, kv_heads, dtype):
    backend, kc, vc, meta, full, (q, k, v) = _long_context_scenario(LONG, heads, kv_heads, dtype=dtype)
    backend.write_kv(kc, vc, k, v, meta.slot_mapping)
    out = backend.attend(q, kc, vc, meta, 0.25, k=k, v=v)
    assert len([key for key in meta.backend_state if key[0] == "prefill_mask"]) == 3  # one per cached prefill
    ref = _reference([tuple(t.float() for t in f) for f in full], LONG, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_write_kv_lands_in_slots():
    backend = TorchAttentionBackend()
    kc = torch.zeros(6, 4, 2, 3)
    vc = torch.zeros_like(kc)
    k = torch.arange(3 * 2 * 3, dtype=torch.float32).view(3, 2, 3)
    slots = torch.tensor([4 * 5 + 2, 0, 4 * 2 + 3])  # block 5 offset 2, block 0 offset 0, block 2 offset 3
    backend.write_kv(kc, vc, k, -k, slots)
    assert torch.equal(kc[5, 2], k[0]) and torch.equal(kc[0, 0], k[1]) and torch.equal(kc[2, 3], k[2])
    assert torch.equal(vc[2, 3], -k[2])
    assert kc.abs().sum() == k.abs().sum()  # nothing else touched


def test_bfloat16_close_to_fp32():
    seqs = [(8, 5), (13, 1), (0, 9)]
    backend, kc, vc, meta, full, (q, k, v) = _scenario(seqs, dtype=torch.bfloat16)
    backend.write_kv(kc, vc, k, v, meta.slot_mapping)
    out = backend.attend(q, kc, vc, meta, 0.25, k=k, v=v)
    assert out.dtype == torch.bfloat16
    ref = torch.cat([dense_causal_attention(q.float(), k.float(), v.float(), 0.25)[c:] for (q, k, v), (c, _) in zip(full, seqs)])
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_metadata_build():
    meta = AttentionMetadata.build([[7, 2], [4, 0, 9]], [3, 0], [2, 9], block_size=4)
    assert meta.positions.tolist() == [3, 4] + list(range(9))
    # seq 0: pos 3 -> block 7 offset 3; pos 4 -> block 2 offset 0
    assert meta.slot_mapping.tolist()[:2] == [7 * 4 + 3, 2 * 4 + 0]
    assert meta.slot_mapping.tolist()[2:] == [16, 17, 18, 19, 0, 1, 2, 3, 36]
    assert meta.query_start_loc.tolist() == [0, 2, 11]
    assert meta.seq_lens.tolist() == [5, 9] and meta.seq_lens_list == [5, 9]
    assert meta.block_tables.tolist() == [[7, 2, 0], [4, 0, 9]]
    assert meta.query_lens == [2, 9] and meta.context_lens == [3, 0]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs, meta.num_tokens) == (9, 9, 2, 11)
    with pytest.raises(ValueError):
        AttentionMetadata.build([[1]], [3], [2], block_size=4)  # 5 tokens do not fit one block


def test_kv_cache_allocate():
    arch = preset("tiny")
    kv = KVCache.allocate(arch, num_blocks=10, block_size=8, dtype="bfloat16", device="cpu")
    assert kv.num_layers == arch.num_layers
    k0, v0 = kv.layer(0)
    assert k0.shape == (10, 8, arch.num_kv_heads, arch.head_dim) and k0.dtype == torch.bfloat16
    assert k0.is_contiguous() and v0.is_contiguous()
    assert kv.nbytes == 10 * 8 * arch.kv_bytes_per_token(torch.bfloat16)
    k0.fill_(1)
    assert kv.value_caches[0].sum() == 0 and kv.key_caches[1].sum() == 0  # layers are disjoint

"""Deterministic mode's batch-invariant ops, without the engine: a row's result must be bitwise
the same however the rows are batched, and close to the plain ops.

CPU (torch) always; the Triton versions on a CUDA device, or on CPU with TRITON_INTERPRET=1 and
Triton installed (slow; checks indexing and the chunked merge, not GPU rounding).
"""

from __future__ import annotations

import dataclasses

import os

import pytest
import torch
import torch.nn.functional as F

from radixserve.model import batch_invariant
from radixserve.model.attention import AttentionMetadata, TorchAttentionBackend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON_DEVICE = torch.cuda.is_available() or INTERPRET


def test_linear_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1728, 576, generator=gen)
    x = torch.randn(300, 576, generator=gen)
    full = batch_invariant.linear(x, weight)
    assert torch.allclose(full, F.linear(x, weight), rtol=1e-4, atol=1e-4)
    for m in (1, 2, 3, 5, 16, 17, 64, 299):
        assert torch.equal(batch_invariant.linear(x[:m], weight), full[:m]), m
    # the same row at another place in the batch
    assert torch.equal(batch_invariant.linear(x[[7, 0, 250]], weight), full[[7, 0, 250]])


def _pool(length: int, *, kv_heads: int, head_dim: int, block_size: int, device, dtype, seed: int = 0):
    """A paged pool holding K/V for positions 0..length-1 of one sequence (shuffled blocks) and
    another sequence's garbage in the rest."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = -(-length // block_size)
    num_blocks = 2 * n_blocks + 4
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    table = torch.randperm(num_blocks, generator=gen)[:n_blocks].tolist()
    return k_cache, v_cache, table


def _steps(length: int, table: list[int], block_size: int) -> dict[str, list[tuple[int, int]]]:
    """Ways to reach the same positions: (context, new tokens) per step."""
    return {
        "fresh prefill": [(0, length)],
        "prefill over a cached prefix at a block boundary": [(0, 4 * block_size), (4 * block_size, length - 4 * block_size)],
        "chunked prefill": [(c, min(37, length - c)) for c in range(0, length, 37)],
        "cached prefix then decodes": [(0, length - 6)] + [(length - 6 + i, 1) for i in range(6)],
    }


def _run_scenarios(attend, q_all, k_cache, v_cache, table, length, block_size, device, others=()):
    """Attention output of every position of the sequence under each scenario; with `others`,
    every step also carries those (context, new) sequences in the same batch."""
    results = {}
    for name, steps in _steps(length, table, block_size).items():
        out = torch.empty_like(q_all)
        for ctx, n in steps:
            extra = list(others)
            tables = [table] + [table] * len(extra)  # extra rows read the same pool (their values are not checked)
            meta = AttentionMetadata.build(tables, [ctx] + [c for c, _ in extra], [n] + [m for _, m in extra], block_size, device=device)
            q = torch.cat([q_all[ctx : ctx + n]] + [q_all[c : c + m] for c, m in extra])
            out[ctx : ctx + n] = attend(q, k_cache, v_cache, meta)[:n]
        results[name] = out
    return results


def _check(results, reference, tol, bitwise=None):
    """Every scenario bitwise equal to the first (or those in `bitwise`), all close to the reference."""
    first = next(iter(results.values()))
    for name, out in results.items():
        if bitwise is None or name in bitwise:
            assert torch.equal(out, first), name
    rel = ((first.float() - reference.float()).norm() / reference.float().norm()).item()
    assert rel < tol, rel


def _dense_reference(q_all, k_cache, v_cache, table, length):
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache[table].reshape(-1, kvh, d)[:length]
    values = v_cache[table].reshape(-1, kvh, d)[:length]
    from radixserve.model.attention import dense_causal_attention

    return dense_causal_attention(q_all.float(), keys.float(), values.float(), 1.0 / 8)


@pytest.mark.parametrize("with_others", [False, True])
def test_torch_attention_same_bits_fresh_cached_chunked_decode(with_others):
    block_size, length, heads, kv_heads, head_dim = 4, 150, 6, 2, 64  # 150 tokens: 3 key chunks of 64
    k_cache, v_cache, table = _pool(length, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, device="cpu", dtype=torch.float32)
    q_all = torch.randn(length, heads, head_dim, generator=torch.Generator().manual_seed(1))
    backend = TorchAttentionBackend()
    backend.set_deterministic(True, 4096)
    others = [(100, 1), (0, 9), (20, 30)] if with_others else []
    results = _run_scenarios(
        lambda q, kc, vc, meta: backend.attend(q, kc, vc, meta, 1.0 / 8), q_all, k_cache, v_cache, table, length, block_size, "cpu", others
    )
    _check(results, _dense_reference(q_all, k_cache, v_cache, table, length), 1e-5)


@pytest.mark.skipif(not HAVE_TRITON_DEVICE, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("with_others", [False, True])
@pytest.mark.parametrize("split", [None, False, True], ids=["plan-chooses", "chunks-walked", "chunk-per-program"])
def test_triton_attention_same_bits_fresh_cached_chunked_decode(monkeypatch, with_others, split):
    """split: the plan's choice, or forced: every program walks its own key chunks (False), or
    every chunk is a program of its own, merged (True)."""
    pytest.importorskip("triton")
    import radixserve.model.triton_attention as TA

    device = "cpu" if INTERPRET else "cuda"
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    monkeypatch.setattr(TA, "DETERMINISTIC_SPLIT_TILES", 1)  # 64-key chunks: several on a short sequence
    block_size, length, heads, kv_heads, head_dim = 16, 150, 8, 2, 64
    k_cache, v_cache, table = _pool(length, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, device=device, dtype=dtype)
    q_all = torch.randn(length, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    backend = TA.TritonAttentionBackend()
    backend.set_deterministic(True, 4096)
    backend.deterministic_split = split
    others = [(100, 1), (0, 9), (20, 30)] if with_others else []
    results = _run_scenarios(
        lambda q, kc, vc, meta: backend.attend(q, kc, vc, meta, 1.0 / 8), q_all, k_cache, v_cache, table, length, block_size, device, others
    )
    # The interpreter's tl.dot is numpy's BLAS, whose result for a row depends on the row's place
    # in the tile (edge micro-kernels); a GPU's MMA does every row alike. So on the interpreter only
    # the scenario whose query tiles line up with the fresh prefill's (a cached prefix of a whole
    # number of query tiles) must match bitwise; that still checks the fixed key chunks and merge.
    aligned = ["fresh prefill", "prefill over a cached prefix at a block boundary"] if INTERPRET else None
    _check(results, _dense_reference(q_all, k_cache, v_cache, table, length), 1e-4 if INTERPRET else 2e-2, aligned)


@pytest.mark.skipif(not HAVE_TRITON_DEVICE, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
def test_triton_linear_rows_do_not_depend_on_the_batch():
    pytest.importorskip("triton")
    from radixserve.model import triton_batch_invariant as TB

    device = "cpu" if INTERPRET else "cuda"
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    n, k = (200, 72) if INTERPRET else (3072, 1024)
    weight = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(300, k, generator=gen).to(device=device, dtype=dtype)
    full = TB.linear(x, weight, bias)
    ref = F.linear(x.float(), weight.float(), bias.float())
    assert ((full.float() - ref).norm() / ref.norm()).item() < (1e-5 if INTERPRET else 1e-2)
    for m in (1, 3, 64, 129, 299) if not INTERPRET else (1, 130):
        assert torch.equal(TB.linear(x[:m], weight, bias), full[:m]), m


def _chunks_of_two_steps(monkeypatch) -> tuple[str, torch.dtype, object]:
    """The Triton matmul tests' setting: the interpreter's fp32 on CPU or bf16 on a GPU, with the
    dtype's K order cut into chunks of 2 MMA steps (so a small K spans several chunks). Returns
    (device, dtype, the reduction order in force)."""
    from radixserve.model import matmul_tiles as MT

    dtype = torch.float32 if INTERPRET else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    order = MT.ReductionOrder(MT.REDUCTION[name].block_k, 2)
    monkeypatch.setitem(MT.REDUCTION, name, order)
    return "cpu" if INTERPRET else "cuda", dtype, order


@pytest.mark.skipif(not HAVE_TRITON_DEVICE, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
def test_triton_linear_split_k_chunks_merge_to_the_same_bits(monkeypatch):
    """K chunks run as separate programs (a decode launch) and merged in chunk order by the last
    to arrive give the bits of one program walking every chunk, for every tile shape; on a GPU
    also across tile shapes (the assumption the M buckets rest on)."""
    pytest.importorskip("triton")
    from radixserve.model import matmul_tiles as MT
    from radixserve.model import triton_batch_invariant as TB

    device, dtype, order = _chunks_of_two_steps(monkeypatch)  # K below: 5.5 chunks, the last one partial
    gen = torch.Generator().manual_seed(3)
    n, k = 200, order.block_k * 11 - 8
    weight = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(40, k, generator=gen).to(device=device, dtype=dtype)
    mm = TB.BatchInvariantMatmul()
    gpu_shapes = [MT.MatmulTiles(16, 64, 4, 4), MT.MatmulTiles(32, 64, 4, 5), MT.MatmulTiles(64, 128, 4, 3), MT.MatmulTiles(128, 128, 8, 4),
                  MT.MatmulTiles(16, 128, 4, 4, "flat"), MT.MatmulTiles(64, 128, 4, 4, "flat_tma"),
                  MT.MatmulTiles(128, 256, 8, 3, "flat_tma"), MT.MatmulTiles(128, 128, 8, 3, "persistent_tma")]  # fmt: skip
    # The interpreter's dot (numpy) gives a row other bits in another tile shape: one shape there,
    # in each kernel form (the loops' additions must agree).
    shapes = [MT.MatmulTiles(16, 32, 4, 2, kernel) for kernel in MT.KERNELS] if INTERPRET else gpu_shapes
    reference = mm.linear(x, weight, bias, tiles=shapes[0], split=False)
    ref = F.linear(x.float(), weight.float(), bias.float())
    assert ((reference.float() - ref).norm() / ref.norm()).item() < (1e-5 if INTERPRET else 1e-2)
    for tiles in shapes:
        for rows in (1, 17, 40):
            for split in (False, True):
                out = mm.linear(x[:rows], weight, bias, tiles=tiles, split=split)
                assert torch.equal(out, reference[:rows]), (tiles, rows, split)
    assert int(mm._arrival_counters(x.device).abs().sum()) == 0  # every split launch reset its counters


@pytest.mark.skipif(not HAVE_TRITON_DEVICE, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("sms", [1, 3, 7, 132])
def test_triton_linear_stream_k_runs_merge_to_the_same_bits(monkeypatch, sms):
    """stream_tma: the (tile, chunk) units cut into runs that start and end anywhere inside a
    tile (a GPU of 1, 3, 7 or 132 SMs, 1-3 programs each) give every row the bits of one program
    walking every chunk; a K of partial chunks falls back to flat_tma with the same bits."""
    pytest.importorskip("triton")
    from radixserve.model import matmul_tiles as MT
    from radixserve.model import triton_batch_invariant as TB

    device, dtype, order = _chunks_of_two_steps(monkeypatch)
    monkeypatch.setattr(TB, "_num_sms", lambda device: sms)
    gen = torch.Generator().manual_seed(5)
    n = 200
    mm = TB.BatchInvariantMatmul()
    block_m = 16 if INTERPRET else 64
    for k in (order.block_k * 10, order.block_k * 11 - 8):  # 5 whole chunks; 5.5 chunks
        weight = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
        bias = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        x = torch.randn(40, k, generator=gen).to(device=device, dtype=dtype)
        reference = mm.linear(x, weight, bias, tiles=MT.MatmulTiles(block_m, 32, 4, 2, "flat_tma"), split=False)
        ref = F.linear(x.float(), weight.float(), bias.float())
        assert ((reference.float() - ref).norm() / ref.norm()).item() < (1e-5 if INTERPRET else 1e-2)
        for per_sm in (1, 3):
            tiles = MT.MatmulTiles(block_m, 32, 4, 2, "stream_tma", per_sm=per_sm)
            for rows in (1, 17, 40):
                for with_bias in (True, False):
                    out = mm.linear(x[:rows], weight, bias if with_bias else None, tiles=tiles)
                    want = reference[:rows] if with_bias else mm.linear(x[:rows], weight, tiles=tiles, split=False)
                    assert torch.equal(out, want), (k, per_sm, rows, with_bias)
    assert int(mm._arrival_counters(x.device).abs().sum()) == 0  # every stream launch reset its counters


@pytest.mark.skipif(not HAVE_TRITON_DEVICE, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
def test_triton_attention_split_and_walked_key_chunks_give_the_same_bits(monkeypatch):
    """Deterministic attention: one program per key chunk merged in chunk order, and one program
    walking every chunk, fold the same partials the same way (the plan picks by GPU fill)."""
    pytest.importorskip("triton")
    import radixserve.model.triton_attention as TA

    device = "cpu" if INTERPRET else "cuda"
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    monkeypatch.setattr(TA, "DETERMINISTIC_SPLIT_TILES", 2)  # 150 keys = 3 tiles of 64: chunks of 2 + 1
    block_size, length, heads, kv_heads, head_dim = 16, 150, 8, 2, 64
    k_cache, v_cache, table = _pool(length, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, device=device, dtype=dtype)
    q_all = torch.randn(length, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    outs = {}
    # split: one program per chunk, merged; walk: one program folds chunk after chunk; flat walk:
    # the same folds in one loop over the tiles; graph: a CUDA graph's launch (nominal lengths),
    # whose splits cover max_model_len: all but a few chunks empty (skipped, never folded)
    variants = (("walk", False, {"flat_walk": False}, False), ("split", True, {}, False), ("flat walk", False, {"flat_walk": True}, False),
                ("split, graph", True, {}, True))  # fmt: skip
    for variant, split, extra, nominal in variants:
        monkeypatch.setattr(TA, "DETERMINISTIC_CFG", dict(TA.DETERMINISTIC_CFG, **extra))
        backend = TA.TritonAttentionBackend()
        backend.set_deterministic(True, 1024)
        backend.deterministic_split = split

        def attend(q, kc, vc, meta, backend=backend, nominal=nominal):
            return backend.attend(q, kc, vc, dataclasses.replace(meta, lengths_are_nominal=nominal), 1.0 / 8)

        outs[variant] = _run_scenarios(attend, q_all, k_cache, v_cache, table, length, block_size, device)
    for variant, *_ in variants[1:]:
        for name in outs["walk"]:
            assert torch.equal(outs["walk"][name], outs[variant][name]), (variant, name)

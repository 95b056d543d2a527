"""The Triton GPU path against the torch reference: paged attention (prefill over cached
prefixes, decode with split keys, fresh prefills), the KV write, RoPE, the fused norms.

Skipped without Triton and a CUDA device (CI). With TRITON_INTERPRET=1 and Triton installed
the same tests run the kernels on CPU in float32 (slow, for debugging without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)

from radixserve.model.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from radixserve.model.triton_attention import TritonAttentionBackend  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
# bf16 on the GPU; the interpreter's bf16 tl.dot is broken, so it checks in float32.
DTYPE = torch.float32 if INTERPRET else torch.bfloat16
TOL = 1e-4 if DTYPE == torch.float32 else 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _paged_setup(seqs, *, heads, kv_heads, head_dim, block_size, dtype=DTYPE, seed=0):
    """seqs: (context_len, query_len) each. Random cached context in shuffled blocks; returns
    the caches, the metadata and the new tokens' q/k/v (not yet written)."""
    gen = torch.Generator().manual_seed(seed)
    need = sum(-(-(c + q) // block_size) for c, q in seqs)
    num_blocks = need + 7
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tables = [[perm.pop() for _ in range(-(-(c + q) // block_size))] for c, q in seqs]
    meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [q for _, q in seqs], block_size, device=DEVICE)
    T = sum(q for _, q in seqs)
    q = torch.randn(T, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(T, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(T, kv_heads, head_dim, generator=gen).to(dtype)
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return to(k_cache), to(v_cache), meta, to(q), to(k), to(v)


def _both(seqs, pass_kv: bool, **shape):
    k_cache, v_cache, meta, q, k, v = _paged_setup(seqs, **shape)
    scale = shape["head_dim"] ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    torch_backend = TorchAttentionBackend()
    torch_backend.write_kv(ref_k, ref_v, k, v, meta.slot_mapping)
    ref = torch_backend.attend(q, ref_k, ref_v, meta, scale, k=k if pass_kv else None, v=v if pass_kv else None)
    ours = TritonAttentionBackend()
    ours.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    out = ours.attend(q, k_cache, v_cache, meta, scale, k=k if pass_kv else None, v=v if pass_kv else None)
    return out, ref, meta


MIXED = [(0, 7), (8, 5), (13, 1), (0, 1), (31, 40), (70, 1), (3, 2)]


@pytest.mark.parametrize("pass_kv", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 16), (9, 3, 64), (4, 4, 32)])
def test_mixed_batch_matches_torch(pass_kv, heads, kv_heads, head_dim):
    out, ref, _ = _both(MIXED, pass_kv, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=4)
    assert not out.isnan().any()
    assert _rel(out, ref) < TOL


def test_cached_prefix_long_context_splits_keys():
    # a short suffix after a long cached prefix: few programs, so the key range is split
    seqs = [(1500, 20), (700, 3)]
    out, ref, meta = _both(seqs, True, heads=8, kv_heads=2, head_dim=32, block_size=16)
    plan = meta.backend_state["triton"]
    assert not plan.fresh and not plan.gathered and plan.launches[0].num_splits > 1
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("pass_kv", [False, True])
def test_long_chunks_over_a_cached_prefix_gather_and_match(monkeypatch, pass_kv):
    # Long chunks over a cached prefix take gather + SDPA (bottom-right causal, or padded
    # queries after a short prefix); lowered threshold so that small shapes take it. Mixed
    # with decodes, a short chunk and a fresh one.
    import radixserve.model.triton_attention as TA

    monkeypatch.setattr(TA, "GATHER_SDPA_MIN_QUERY", 16)
    seqs = [(37, 20), (5, 1), (100, 3), (0, 24), (16, 16), (50, 1), (4, 30)]  # (4, 30): queries padded
    out, ref, meta = _both(seqs, pass_kv, heads=8, kv_heads=2, head_dim=32, block_size=8)
    plan = meta.backend_state["triton"]
    assert [g[0] for g in plan.gathered] == ([0, 4, 6] if pass_kv else [0, 3, 4, 6])
    assert plan.fresh == ([(24, 24)] if pass_kv else [])
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("seqs", [[(1000, 1)], [(5, 1), (300, 1), (64, 1), (1, 1)], [(100 * i + 3, 1) for i in range(40)]])
def test_decode_matches_torch(seqs):
    out, ref, meta = _both(seqs, False, heads=8, kv_heads=2, head_dim=64, block_size=16)
    assert _rel(out, ref) < TOL


def test_fresh_prefills_use_sdpa_and_match():
    seqs = [(0, 33), (0, 5)]
    out, ref, meta = _both(seqs, True, heads=8, kv_heads=2, head_dim=32, block_size=16)
    plan = meta.backend_state["triton"]
    assert plan.fresh == [(0, 33), (33, 5)] and not plan.launches
    assert _rel(out, ref) < TOL


def test_write_kv_skips_negative_slots():
    k_cache, v_cache, meta, q, k, v = _paged_setup([(0, 4)], heads=4, kv_heads=2, head_dim=16, block_size=4)
    before = k_cache.clone()
    TritonAttentionBackend().write_kv(k_cache, v_cache, k, v, torch.full((4,), -1, dtype=torch.long, device=DEVICE))
    assert torch.equal(k_cache, before)


def test_rope_write_kv_matches_torch():
    from radixserve.model.arch import preset
    from radixserve.model.llama import RotaryEmbedding
    from radixserve.model.triton_kernels import rope_write_kv

    arch = preset("llama3.2-1b")
    arch.max_position_embeddings = 4096
    rot = RotaryEmbedding(arch)
    T, H, KV, D = 13, arch.num_heads, arch.num_kv_heads, arch.head_dim
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=gen).to(DTYPE).to(DEVICE)
    pos = torch.randint(0, 4000, (T,), generator=gen).to(DEVICE)
    slots = torch.randperm(64, generator=gen)[:T].to(DEVICE)
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
    cos, sin = rot.cos_sin(pos, DTYPE)
    ref_q, ref_k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
    ref_v = v.clone()
    kc = torch.zeros(16, 4, KV, D, dtype=DTYPE, device=DEVICE)
    vc = torch.zeros_like(kc)
    cos_t, sin_t = rot.tables(DEVICE)
    rope_write_kv(q, k, v, cos_t, sin_t, pos, slots, kc, vc)
    # bf16: a few elements differ by one unit in the last place from torch's op-by-op rounding
    rope_tol = 1e-5 if DTYPE == torch.float32 else 5e-3
    assert _rel(q, ref_q) < rope_tol and _rel(k, ref_k) < rope_tol
    assert torch.equal(kc.view(-1, KV, D)[slots], k) and torch.equal(vc.view(-1, KV, D)[slots], ref_v)


def test_fused_norms_and_silu_match_torch():
    from radixserve.model.llama import RMSNorm
    from radixserve.model.triton_kernels import add_rms_norm, rms_norm, silu_mul

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 576, generator=gen).to(DTYPE).to(DEVICE)
    d = torch.randn(6, 576, generator=gen).to(DTYPE).to(DEVICE)
    norm = RMSNorm(576, 1e-5, dtype=DTYPE, device=DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        assert _rel(rms_norm(x, norm.weight, 1e-5), norm(x)) < 1e-5
        res, h = add_rms_norm(x, d, norm.weight, 1e-5)
        assert torch.equal(res, x + d)
        assert _rel(h, norm(x + d)) < 1e-5
    gu = torch.randn(5, 2 * 1500, generator=gen).to(DTYPE).to(DEVICE)
    g, u = gu.split(1500, dim=-1)
    assert _rel(silu_mul(gu), torch.nn.functional.silu(g) * u) < 1e-5


def test_tiny_model_logits_match_torch_backend():
    """The whole model on the Triton path (fused ops + paged kernels) against the torch path,
    same weights: one prefill, a cached-prefix chunk, then decode steps."""
    from radixserve.model.arch import preset
    from radixserve.model.attention import KVCache
    from radixserve.model.llama import LlamaForCausalLM

    arch = preset("tiny")
    models = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        m = LlamaForCausalLM(arch, backend, dtype=DTYPE, device=DEVICE)
        m.init_dummy_weights(seed=1)
        models.append(m)
    ids = torch.randint(0, arch.vocab_size, (45,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    chunks = [20, 17, 1, 1, 1, 4, 1]
    outs = []
    for m in models:
        kv = KVCache.allocate(arch, 32, 4, DTYPE, DEVICE)
        table = list(range(31, 31 - 12, -1))
        done, logits = 0, []
        for c in chunks:
            meta = AttentionMetadata.build([table], [done], [c], 4, device=DEVICE)
            logits.append(m.compute_logits(m(ids[done : done + c], meta, kv)))
            done += c
        outs.append(torch.cat(logits))
    assert _rel(outs[1], outs[0]) < TOL

"""TritonAttentionBackend: the GPU attention backend (paged prefill, paged decode, KV write).

Imported lazily (only for CUDA devices, see `default_backend`): CI machines have no Triton.

How a step is attended (the decisions are made once per step on the host, from the metadata's
host lists, and reused by every layer):
- all sequences are fresh prefills (no cached prefix): torch SDPA (flash) per sequence on the
  new tokens' own K/V, which the layer hands over; the pool is written but not read back;
- otherwise two launches of one paged kernel, both reading K/V straight from the pool through
  the block tables: the single-token (decode) sequences with a small query tile, the rest
  (prefill chunks over a cached prefix) with a large one. When a launch has too few programs
  to fill the GPU (batch-1 decode, a short suffix after a long cached prefix) the key range is
  split across programs (flash-decoding) and the splits are merged by a second small kernel.

Decode launch shapes depend only on the batch size, never on sequence lengths, so a decode
step can be captured in a CUDA graph and replayed for any lengths (see radixserve/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixserve.model import triton_kernels as K
from radixserve.model.attention import AttentionBackend, AttentionMetadata

# Launch shapes, picked by bench/bench_gpu_kernels.py on an H100 (Llama-3-8B attention shapes,
# timed over 32 layers' KV pools so that L2 is cold as in a real forward). Decode: 16 query rows
# (the GROUP query heads of one KV head, padded: tl.dot needs 16), 128 keys (8 pages) per tile.
# Prefill chunks of >= 256 tokens: 64 x 64 tiles. A short chunk after a long cached prefix
# (64 new after 4032 cached): 64 x 128 tiles, 3 stages, page ids prefetched a tile ahead, keys
# split so that the launch is one full wave (29.5 us a layer; 5 splits = 1.2 waves took 45 us).
DECODE_CFG = dict(block_m=16, block_n=128, num_warps=4, num_stages=2)
PREFILL_SHORT_CFG = dict(block_m=64, block_n=128, num_warps=4, num_stages=3, prefetch=True)
PREFILL_LONG_CFG = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
MAX_SPLITS = 16
# Arrival counters of split launches that merge in-kernel (one per sequence x query block x KV
# head); a launch with more groups than this falls back to the separate merge kernel.
MERGE_COUNTERS = 1 << 14


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
class _Launch:
    seq_ids: torch.Tensor | None  # None: all sequences of the batch, in order
    num_seqs: int
    n_qblocks: int
    num_splits: int
    cfg: dict


@dataclass(slots=True)
class _StepPlan:
    cold: bool  # every sequence is a prefill with no cached prefix: SDPA on the fresh K/V
    launches: list[_Launch]


class TritonModelKernels:
    """Fused elementwise ops the Llama layers use on GPU instead of chains of torch ops."""

    rms_norm = staticmethod(K.rms_norm)
    add_rms_norm = staticmethod(K.add_rms_norm)
    silu_mul = staticmethod(K.silu_mul)
    rope_write_kv = staticmethod(K.rope_write_kv)


class TritonAttentionBackend(AttentionBackend):
    """Paged attention on Triton kernels (see the module docstring)."""

    kernels = TritonModelKernels()

    def __init__(self) -> None:
        self._sdpa_gqa_ok: bool | None = None  # does SDPA's flash kernel take GQA directly?
        self._counters: torch.Tensor | None = None  # zeroed once; the kernel leaves it zeroed

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
        qlens, slens = meta.query_lens, meta.seq_lens_list
        cold = have_kv and all(q > 1 and q == s for q, s in zip(qlens, slens))
        launches: list[_Launch] = []
        if not cold:
            decode = [i for i, q in enumerate(qlens) if q == 1]
            prefill = [i for i, q in enumerate(qlens) if q > 1]
            everyone = len(qlens)
            group_p = 1 << (max(1, num_heads // num_kv_heads) - 1).bit_length()
            if decode:
                ids = None if len(decode) == everyone else torch.tensor(decode, dtype=torch.int32).to(device)
                splits = self.decode_splits(len(decode), num_kv_heads, device)
                cfg = dict(DECODE_CFG, block_m=max(DECODE_CFG["block_m"], group_p))
                launches.append(_Launch(ids, len(decode), 1, splits, cfg))
            if prefill:
                ids = None if len(prefill) == everyone else torch.tensor(prefill, dtype=torch.int32).to(device)
                max_q = max(qlens[i] for i in prefill)
                cfg = PREFILL_LONG_CFG if max_q * group_p >= 1024 else PREFILL_SHORT_CFG
                cfg = _fit_stages(dict(cfg, block_m=max(cfg["block_m"], group_p)), head_dim, elem_bytes, device)
                block_q = cfg["block_m"] // group_p
                n_qblocks = -(-max_q // block_q)
                programs = sum(-(-qlens[i] // block_q) for i in prefill) * num_kv_heads
                tiles = -(-max(slens[i] for i in prefill) // cfg["block_n"])
                splits = 1
                sms = _num_sms(device)
                if programs < sms and tiles >= 8:  # at most one wave: a partial second wave costs a whole one
                    splits = max(1, min(MAX_SPLITS, sms // programs, tiles // 4))
                launches.append(_Launch(ids, len(prefill), n_qblocks, splits, cfg))
        plan = _StepPlan(cold, launches)
        meta.backend_state["triton"] = plan
        return plan

    # ---- attention ---------------------------------------------------------------------
    def attend(self, q, layer_k_cache, layer_v_cache, meta, scale, k=None, v=None) -> torch.Tensor:
        T, H, D = q.shape
        kvh = layer_k_cache.shape[2]
        plan = self.plan(meta, kvh, H, D, q.element_size(), q.device, k is not None and v is not None)
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        if plan.cold:
            start = 0
            for n in meta.query_lens:
                out[start : start + n] = self._sdpa_causal(q[start : start + n], k[start : start + n], v[start : start + n], scale)
                start += n
            return out
        for launch in plan.launches:
            K.paged_attention(
                q, layer_k_cache, layer_v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                num_seqs=launch.num_seqs, n_qblocks=launch.n_qblocks, seq_ids=launch.seq_ids,
                num_splits=launch.num_splits, counters=self._merge_counters(q.device), **launch.cfg,
            )  # fmt: skip
        return out

    def _sdpa_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of one fresh sequence: q [L, H, D], k/v [L, KV, D] -> [L, H, D]."""
        qt, kt, vt = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        if gqa and self._sdpa_gqa_ok is not False:
            try:
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
                self._sdpa_gqa_ok = True
                return o[0].transpose(0, 1)
            except RuntimeError:
                self._sdpa_gqa_ok = False
        if gqa:  # older torch: expand the KV heads (a copy of this sequence's new K/V only)
            rep = q.shape[1] // k.shape[1]
            kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        return o[0].transpose(0, 1)

"""Paged attention: the batch metadata, the KV block pool tensors, and the attention backends.

The model runs on a flattened batch of T new tokens from B sequences. Each sequence's context
(its cached prefix plus the new tokens) lives in fixed-size KV blocks listed by its block table;
the new tokens always sit at the end of that context.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from radixserve.model import batch_invariant
from radixserve.model.arch import ModelArch, parse_dtype
from radixserve.model.cascade import CascadeMetadata
from radixserve.step import StepInput


@dataclass(slots=True)
class AttentionMetadata:
    """Where the T new tokens of a step come from and where their K/V goes.

    Build one from a step's record with `AttentionMetadata.from_step(...)` (the runner, the CUDA
    graphs), or from plain lists with `AttentionMetadata.build(...)` (tests, benchmarks).
    Sequence i owns new tokens query_start_loc[i]:query_start_loc[i+1]; its context is
    seq_lens[i] tokens long, of which the last query_lens[i] are the new ones.
    """

    positions: torch.Tensor  # [T] long: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset, where its K/V goes
    query_start_loc: torch.Tensor  # [B+1] long: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] long: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0
    query_lens: list[int]  # host copy: new tokens per sequence
    seq_lens_list: list[int]  # host copy of seq_lens
    # Derived host-side facts the CPU backend branches on (filled in __post_init__).
    max_query_len: int = field(default=0)
    max_seq_len: int = field(default=0)
    # Per-step decisions a backend derives once and reuses in every layer (launch plans).
    backend_state: dict = field(default_factory=dict)
    # True for a CUDA graph's capture: the host lengths are placeholders, so a backend may only
    # plan launches that are valid for any real lengths (no host-side slicing by length).
    lengths_are_nominal: bool = False
    # Decode rows that share a cached prefix (model/cascade.py); None: no cascade this step.
    # Only the Triton backend reads it (with cascade attention on); the others attend as usual.
    cascade: CascadeMetadata | None = None

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.seq_lens_list):
            raise ValueError("query_lens and seq_lens_list must have one entry per sequence")
        self.max_query_len = max(self.query_lens, default=0)
        self.max_seq_len = max(self.seq_lens_list, default=0)

    @property
    def num_seqs(self) -> int:
        """B, the number of sequences in the batch."""
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        """T, the number of new tokens in the batch."""
        return int(self.positions.shape[0])

    @property
    def context_lens(self) -> list[int]:
        """Tokens already in the cache before this step, per sequence."""
        return [s - q for s, q in zip(self.seq_lens_list, self.query_lens)]

    @classmethod
    def from_step(
        cls,
        step: StepInput,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        lengths_are_nominal: bool = False,
        cascade: CascadeMetadata | None = None,
    ) -> AttentionMetadata:
        """The one builder every path uses: a step's record (its host lengths, which the CPU
        backend and the Triton planner read) and the device copies of its lists, wherever they
        were put (one pinned upload in the runner, a CUDA graph's static buffers, plain tensors).
        `lengths_are_nominal`: the step's lengths are capture placeholders (see the field)."""
        return cls(
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            query_lens=step.query_lens,
            seq_lens_list=step.seq_lens,
            lengths_are_nominal=lengths_are_nominal,
            cascade=cascade,
        )

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for B sequences (tests, benchmarks: no token ids needed).

        block_tables[i]: the block ids holding sequence i's context (cached prefix and new
        tokens), in order; it must cover context_lens[i] + query_lens[i] tokens.
        context_lens[i]: tokens already in the cache (their K/V is in the blocks).
        query_lens[i]: new tokens this step (>= 1).
        """
        if not (len(block_tables) == len(context_lens) == len(query_lens)):
            raise ValueError("block_tables, context_lens and query_lens must have the same length")
        for table, ctx, n in zip(block_tables, context_lens, query_lens):
            if n < 1:
                raise ValueError("every sequence needs at least one new token")
            if len(table) * block_size < ctx + n:
                raise ValueError(
                    f"block table of {len(table)} blocks cannot hold {ctx + n} tokens (block_size {block_size})"
                )
        step = StepInput.build(block_size, (
            ([0] * n, ctx, list(table), False) for table, ctx, n in zip(block_tables, context_lens, query_lens)
        ))  # fmt: skip

        def tensor(x) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.long).to(device)

        return cls.from_step(
            step, tensor(step.positions), tensor(step.slot_mapping), tensor(step.query_start_loc),
            tensor(step.seq_lens), tensor(padded_block_tables(step)),
        )  # fmt: skip


def padded_block_tables(step: StepInput) -> np.ndarray:
    """The step's block tables as one int64 array [B, step.max_blocks], padded with block 0
    (never read: attention stops at each sequence's length)."""
    tables = np.zeros((step.num_seqs, step.max_blocks), dtype=np.int64)
    for i, blocks in enumerate(step.block_tables):
        tables[i, : len(blocks)] = blocks
    return tables


@dataclass(slots=True)
class KVCache:
    """The paged KV pool: per layer, key and value tensors [num_blocks, block_size, kv_heads, head_dim].

    All layers are views into one allocation [num_layers, 2, num_blocks, block_size, kv_heads,
    head_dim], so moving or copying whole blocks (offload tiers) is a single indexing op.
    """

    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]
    num_blocks: int
    block_size: int
    storage: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        arch: ModelArch,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | str,
        device: torch.device | str,
    ) -> KVCache:
        """Zero-filled pool for `arch` (zeros, so never-written slots can't hold NaNs)."""
        dtype = parse_dtype(dtype)
        storage = torch.zeros(
            arch.num_layers,
            2,
            num_blocks,
            block_size,
            arch.num_kv_heads,
            arch.head_dim,
            dtype=dtype,
            device=device,
        )
        return cls(
            key_caches=[storage[i, 0] for i in range(arch.num_layers)],
            value_caches=[storage[i, 1] for i in range(arch.num_layers)],
            num_blocks=num_blocks,
            block_size=block_size,
            storage=storage,
        )

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) of layer i."""
        return self.key_caches[i], self.value_caches[i]

    @property
    def num_layers(self) -> int:
        return len(self.key_caches)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks, every layer's K and V at once: block dst := block src for each
        (src, dst) pair (copy-on-write of a partial block shared by forked choices). All sources
        are read before any destination is written."""
        if not copies:
            return
        device = self.key_caches[0].device
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
        if self.storage is not None:  # [layers, 2, blocks, ...]: one gather, one scatter
            self.storage.index_copy_(2, dst, self.storage.index_select(2, src))
            return
        for cache in self.key_caches + self.value_caches:
            cache.index_copy_(0, dst, cache.index_select(0, src))

    @property
    def nbytes(self) -> int:
        """Total bytes of the pool."""
        return sum(t.numel() * t.element_size() for t in self.key_caches + self.value_caches)


class AttentionBackend(abc.ABC):
    """How a layer stores its new K/V and attends over a paged context.

    Shapes: q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim]; layer caches
    [num_blocks, block_size, num_kv_heads, head_dim]. Heads are grouped HF-style: query head h
    reads KV head h // (num_heads // num_kv_heads).

    `kernels`: None, or fused elementwise ops (rms_norm, add_rms_norm, silu_mul, rope_write_kv)
    the model uses instead of its plain torch ops (the GPU backend has them; see llama.py).
    """

    kernels = None
    # Deterministic mode (set_deterministic): one batch-invariant attention computation for
    # fresh prefill, prefill over a cached prefix and decode (see model/batch_invariant.py).
    deterministic = False
    # Cascade attention (model/cascade.py): whether attend() reads meta.cascade. The runner
    # plans a step's cascade only for a backend that sets this (the Triton one, when enabled).
    cascade = False
    # Fresh prefills run at lengths rounded up to a multiple of this (None: at their own length);
    # the start-up warm-up runs one of each length up to the step's token budget.
    fresh_length_step: int | None = None

    def set_deterministic(self, enabled: bool, max_model_len: int) -> None:
        """Turn deterministic mode on or off (LlamaForCausalLM.set_deterministic calls this).
        max_model_len bounds the key chunks a CUDA graph's attention must cover."""
        self.deterministic = enabled

    @abc.abstractmethod
    def write_kv(
        self,
        layer_k_cache: torch.Tensor,
        layer_v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store the new tokens' K/V at their slots (block_id * block_size + offset)."""

    @abc.abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        layer_k_cache: torch.Tensor,
        layer_v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of each new query over its sequence's context -> [T, num_heads, head_dim].

        Must run after write_kv for the same step: the context includes the new tokens. k/v,
        the new tokens' fresh K/V, are an optional hint a backend may use to skip reading
        the cache (e.g. for sequences with no cached prefix).
        """


class TorchAttentionBackend(AttentionBackend):
    """Reference backend on plain torch ops; the fast path on CPU.

    Prefill sequences are handled one at a time with scaled_dot_product_attention (the CPU
    flash kernel wants 4-D [1, heads, len, dim] inputs; strided views are fine). All decode
    sequences (one new token each) go through one padded, batched SDPA call.
    """

    def write_kv(
        self,
        layer_k_cache: torch.Tensor,
        layer_v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        nb, block_size, kvh, d = layer_k_cache.shape
        layer_k_cache.view(nb * block_size, kvh, d).index_copy_(0, slot_mapping, k.to(layer_k_cache.dtype))
        layer_v_cache.view(nb * block_size, kvh, d).index_copy_(0, slot_mapping, v.to(layer_v_cache.dtype))

    def attend(
        self,
        q: torch.Tensor,
        layer_k_cache: torch.Tensor,
        layer_v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.deterministic:
            return batch_invariant.attend(q, layer_k_cache, layer_v_cache, meta, scale)
        T, H, D = q.shape
        out = q.new_empty(T, H, D)
        decode_rows: list[int] = []  # token row of each decode sequence
        decode_seqs: list[int] = []
        start = 0
        for i, (qlen, slen) in enumerate(zip(meta.query_lens, meta.seq_lens_list)):
            end = start + qlen
            if qlen == 1 and slen > 1:
                decode_rows.append(start)
                decode_seqs.append(i)
            else:
                out[start:end] = self._prefill_one(
                    q[start:end], layer_k_cache, layer_v_cache, meta, i, scale,
                    None if k is None else k[start:end],
                    None if v is None else v[start:end],
                )  # fmt: skip
            start = end
        if decode_rows:
            self._decode_batch(q, out, layer_k_cache, layer_v_cache, meta, decode_rows, decode_seqs, scale)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` context rows of one sequence -> [length, kv_heads, dim]."""
        _, block_size, kvh, d = cache.shape
        return cache.index_select(0, blocks).view(-1, kvh, d)[:length]

    @staticmethod
    def _step_mask(meta: AttentionMetadata, i: int, context: int, total: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [total - context, total] of sequence i's new tokens over its whole context:
        query j (position context + j) sees keys 0..context + j. Built once per step and shared
        by every layer (meta.backend_state), already in SDPA's additive form."""
        key = ("prefill_mask", i)
        mask = meta.backend_state.get(key)
        if mask is None:
            device = meta.positions.device
            pos_q = torch.arange(context, total, device=device)
            visible = torch.arange(total, device=device)[None, :] <= pos_q[:, None]
            mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
            meta.backend_state[key] = mask
        return mask

    @staticmethod
    def _sdpa(q, keys, values, mask, causal: bool, scale: float) -> torch.Tensor:
        """q [L, H, D] over keys/values [S, KV, D] -> [L, H, D]."""
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0).transpose(1, 2), keys.unsqueeze(0).transpose(1, 2), values.unsqueeze(0).transpose(1, 2),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != keys.shape[1],
        )  # fmt: skip
        return o[0].transpose(0, 1)

    def _prefill_one(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        i: int,
        scale: float,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
    ) -> torch.Tensor:
        L = q.shape[0]
        S = meta.seq_lens_list[i]
        ctx = S - L
        if ctx == 0 and k_new is not None and v_new is not None:
            # Nothing cached: the fresh K/V is the whole context, no gather needed.
            return self._sdpa(q, k_new, v_new, None, True, scale)
        block_size = k_cache.shape[1]
        blocks = meta.block_tables[i, : (S + block_size - 1) // block_size]
        keys = self._gather(k_cache, blocks, S)
        values = self._gather(v_cache, blocks, S)
        if L == 1:  # the one query is the last position: it sees every key
            return self._sdpa(q, keys, values, None, False, scale)
        if ctx == 0:
            return self._sdpa(q, keys, values, None, True, scale)
        return self._sdpa(q, keys, values, self._step_mask(meta, i, ctx, S, q.dtype), False, scale)

    def _decode_batch(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        rows: list[int],
        seqs: list[int],
        scale: float,
    ) -> None:
        _, H, D = q.shape
        _, block_size, kvh, _ = k_cache.shape
        group = H // kvh
        B = len(rows)
        seq_lens = [meta.seq_lens_list[i] for i in seqs]
        max_len = max(seq_lens)
        nblocks = (max_len + block_size - 1) // block_size
        row_idx = torch.tensor(rows, device=q.device)
        if B == len(meta.query_lens):
            tables = meta.block_tables[:, :nblocks]
        else:
            tables = meta.block_tables[torch.tensor(seqs, device=q.device), :nblocks]
        # [B * nblocks, block_size, kvh, D] -> [B, kvh, S, D]. index_select, not k_cache[tables]: advanced
        # indexing with a 2-D index is ~1000x slower on CPU.
        flat = tables.reshape(-1)
        keys = k_cache.index_select(0, flat).view(B, nblocks * block_size, kvh, D)[:, :max_len].transpose(1, 2)
        values = v_cache.index_select(0, flat).view(B, nblocks * block_size, kvh, D)[:, :max_len].transpose(1, 2)
        # A decode query has no causal constraint, so the `group` query heads sharing a KV head
        # can ride as `group` query rows of that head: no K/V repeat, one bigger matmul.
        qg = q.index_select(0, row_idx).view(B, kvh, group, D)
        mask = None
        if min(seq_lens) != max_len:
            lens = torch.tensor(seq_lens, device=q.device)
            mask = (torch.arange(max_len, device=q.device)[None, :] < lens[:, None]).view(B, 1, 1, max_len)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
        out.index_copy_(0, row_idx, o.reshape(B, H, D))


def default_backend(device: torch.device | str) -> AttentionBackend:
    """The backend for a device: Triton kernels on CUDA (imported only then: CI has no Triton),
    the torch reference elsewhere."""
    if torch.device(device).type == "cuda":
        try:
            from radixserve.model.triton_attention import TritonAttentionBackend
        except ImportError as e:  # no Triton on this CUDA machine: the reference still runs
            import warnings

            warnings.warn(f"Triton is unavailable ({e}); using the slow torch attention backend on GPU")
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    return TorchAttentionBackend()


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain causal attention over one whole sequence (q [L, H, D], k/v [L, KV, D]) in fp32.

    The unpaged reference the backends are tested against.
    """
    H, KV = q.shape[1], k.shape[1]
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))
    kf = kf.repeat_interleave(H // KV, 0)
    vf = vf.repeat_interleave(H // KV, 0)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (qf @ kf.transpose(1, 2)) * scale
    L = q.shape[0]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(0, 1).to(q.dtype)

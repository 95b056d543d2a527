"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2, Qwen3) over a paged KV cache.

Parameters mirror Hugging Face names except that q/k/v and gate/up are stacked into one matrix
each (`qkv_proj`, `gate_up_proj`): one matmul instead of three or two. `load_weights` takes HF
names and copies each tensor into its slice, so HF state dicts load as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.model.arch import ModelArch
from radixserve.model.attention import AttentionBackend, AttentionMetadata, KVCache, TorchAttentionBackend

LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear whose matmul deterministic mode swaps for a batch-invariant one
    (`LlamaForCausalLM.set_deterministic`), and which on CPU may multiply by a oneDNN-packed copy
    of its weight (`LlamaForCausalLM.set_packed_weights`); same parameters, same state dict."""

    invariant_linear: LinearFn | None = None
    packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invariant_linear is not None:
            return self.invariant_linear(x, self.weight, self.bias)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack_weight` works here: fp32 weights on the CPU of a torch with oneDNN."""
    return (
        device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )  # fmt: skip


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] reordered into oneDNN's blocked layout for `_linear_pointwise`."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, then cast back before the weight (exactly as HF Llama does)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(arch: ModelArch, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32 for the arch's RoPE type (same math as transformers)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (
        arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    kind = arch.rope_type
    scaling = arch.rope_scaling or {}
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_ctx / low
        high_freq_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding:
    """RoPE in the HF rotate-half layout, with a cos/sin table built lazily and grown on demand.

    The table holds one row per position, so a step's cos/sin is a gather by `positions`:
    sequences at different offsets in one flattened batch each get their own angles.
    """

    def __init__(self, arch: ModelArch, freq_factors: torch.Tensor | None = None) -> None:
        self.arch = arch
        # Table size built up front (the loader sets it to the serving context length). On CPU
        # the table also grows on demand; on GPU reading positions would cost a device sync.
        self.max_positions = arch.max_position_embeddings
        # llama.cpp GGUFs of Llama 3.x carry their scaled frequencies as per-frequency divisors.
        self.freq_factors = freq_factors
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def set_freq_factors(self, freq_factors: torch.Tensor | None) -> None:
        self.freq_factors = freq_factors
        self._cos = self._sin = None

    def _build(self, length: int, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.arch, device)
        if self.freq_factors is not None:
            inv_freq = inv_freq / self.freq_factors.to(device=device, dtype=torch.float32)
        freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self._cos, self._sin = freqs.cos(), freqs.sin()

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole fp32 cos/sin tables [max_position_embeddings, head_dim/2] on `device`, for
        fused kernels that look rows up by position themselves (built once, before any CUDA
        graph capture, and never reallocated while graphs hold their addresses)."""
        need = self.arch.max_position_embeddings
        if self._cos is None or self._cos.shape[0] < need or self._cos.device != device:
            self._build(need, device)
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim/2] in `dtype` for the given positions."""
        cos = self._cos
        need = self.max_positions
        if positions.device.type == "cpu" and positions.numel():
            # Cheap on CPU; lets positions run past max_position_embeddings if a user asks.
            need = max(need, int(positions.max()) + 1)
        if cos is None or cos.shape[0] < need or cos.device != positions.device:
            self._build(need, positions.device)
        cos = self._cos.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self._sin.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim]; same rounding as HF's x*cos + rotate_half(x)*sin."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, dtype=None, device=None) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias, **kw)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False, **kw)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        kernels = self.backend.kernels
        if kernels is not None:
            # cos/sin are the whole tables here; one kernel rotates q and k in place and
            # stores k and v at their slots.
            kernels.rope_write_kv(q, k, v, cos, sin, meta.positions, meta.slot_mapping, k_cache, v_cache)
        else:
            q = RotaryEmbedding.apply(q, cos, sin)
            k = RotaryEmbedding.apply(k, cos, sin)
            self.backend.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = self.backend.attend(q, k_cache, v_cache, meta, self.scale, k=k, v=v)
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype=None, device=None) -> None:
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        # In place on the fresh gate_up buffer (forward runs under inference_mode): skipping two
        # [T, intermediate] temporaries makes the CPU prefill ~10% faster; down_proj reads the
        # strided view directly.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, dtype=None, device=None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, backend, dtype=dtype, device=device)
        self.mlp = LlamaMLP(arch, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, x, cos, sin, k_cache, v_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, delta, cos, sin, k_cache, v_cache, meta, kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """The same arithmetic on the GPU kernels: returns (residual, mlp_out) with the MLP's
        residual add left pending, so the next layer's input norm adds it in the same pass
        (one kernel fewer per layer). delta: the previous layer's pending output, or None."""
        norm1, norm2, mlp = self.input_layernorm, self.post_attention_layernorm, self.mlp
        if delta is None:
            h = kernels.rms_norm(x, norm1.weight, norm1.eps)
        else:
            x, h = kernels.add_rms_norm(x, delta, norm1.weight, norm1.eps)
        x, h = kernels.add_rms_norm(x, self.self_attn(h, cos, sin, k_cache, v_cache, meta), norm2.weight, norm2.eps)
        return x, mlp.down_proj(kernels.silu_mul(mlp.gate_up_proj(h)))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, dtype=None, device=None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, backend, dtype=dtype, device=device) for _ in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)


# HF parameter name suffix -> (our parameter suffix, shard index) for the stacked matrices.
_STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head over a flattened batch and a paged KV cache (see docs/internals.md).

    Build on the "meta" device and `to_empty()` to avoid allocating weights twice. Tied
    models hold no lm_head parameter (logits read embed_tokens), so nothing needs re-tying.
    """

    def __init__(
        self,
        arch: ModelArch,
        backend: AttentionBackend | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.backend = backend if backend is not None else TorchAttentionBackend()
        self.model = LlamaModel(arch, self.backend, dtype=dtype, device=device)
        # Tied models have no lm_head of their own: logits read the embedding matrix.
        self.lm_head = (
            None
            if arch.tie_word_embeddings
            else Linear(arch.hidden_size, arch.vocab_size, bias=False, dtype=dtype, device=device)
        )
        self.rotary = RotaryEmbedding(arch)
        self.invariant_linear: LinearFn | None = None  # set by set_deterministic
        self.packed_lm_head: torch.Tensor | None = None  # set by set_packed_weights
        self._packed_versions: dict[int, int] = {}  # id(weight) -> its _version when packed

    def set_deterministic(self, enabled: bool, max_model_len: int | None = None) -> None:
        """Deterministic mode on or off: batch-invariant matmuls in every linear layer and the
        LM head, and the backend's batch-invariant attention (see model/batch_invariant.py and,
        on GPU, model/triton_batch_invariant.py). Call before capturing CUDA graphs."""
        fn = None
        if enabled:
            if self.backend.kernels is not None:  # the Triton backend: GPU kernels
                from radixserve.model.triton_batch_invariant import BatchInvariantMatmul

                fn = BatchInvariantMatmul(self.device).linear
            else:
                from radixserve.model.batch_invariant import linear as fn
        self.invariant_linear = fn
        for module in self.modules():
            if isinstance(module, Linear):
                module.invariant_linear = fn
        self.backend.set_deterministic(enabled, max_model_len or self.arch.max_position_embeddings)

    def set_packed_weights(self, enabled: bool) -> bool:
        """CPU, fp32: multiply every decoder linear layer by a oneDNN-packed copy of its weight
        (packed once here instead of reordered inside every call: the matmuls of a short prefill
        over a cached prefix run ~20% faster; see docs/benchmarks.md#cpu-ttft-vs-llama-cpp). The
        copies double the decoder weights' memory. Returns whether packing is on; it never is
        on a GPU, in another dtype, or where torch was built without oneDNN."""
        enabled = enabled and packing_supported(self.device, self.dtype)
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed_weight = self._packed(module.weight, module.packed_weight) if enabled else None
        # The LM head too (the tied embedding matrix): one row of logits is a GEMV that F.linear
        # runs on one thread; the packed one uses them all (10.0 -> 5.3 ms at 2 threads).
        self.packed_lm_head = self._packed(self._lm_head_weight, self.packed_lm_head) if enabled else None
        return enabled

    def _packed(self, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
        """`packed` if it was made from `weight` as it is now (engines built one after another
        on one LoadedModel reuse it: packing takes ~0.5 s), else a new packing."""
        version = self._packed_versions.get(id(weight))
        if packed is not None and version == weight._version:
            return packed
        self._packed_versions[id(weight)] = weight._version
        return pack_weight(weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """input_ids [T] (flattened batch) -> final-normed hidden states [T, hidden]."""
        h = self.model.embed_tokens(input_ids)
        kernels = self.backend.kernels
        if kernels is not None:  # GPU: fused kernels, the RoPE tables read by position in-kernel
            cos, sin = self.rotary.tables(h.device)
            delta = None
            for i, layer in enumerate(self.model.layers):
                h, delta = layer.forward_fused(h, delta, cos, sin, kv_cache.key_caches[i], kv_cache.value_caches[i], meta, kernels)
            norm = self.model.norm
            return kernels.add_rms_norm(h, delta, norm.weight, norm.eps)[1]
        cos, sin = self.rotary.cos_sin(meta.positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, kv_cache.key_caches[i], kv_cache.value_caches[i], meta)
        return self.model.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab] in fp32."""
        weight = self._lm_head_weight
        if self.invariant_linear is not None:
            return self.invariant_linear(hidden, weight, None).float()
        if self.packed_lm_head is not None:
            return torch.ops.mkldnn._linear_pointwise(hidden, self.packed_lm_head, None, "none", [], "").float()
        return F.linear(hidden, weight).float()

    @property
    def _lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the (stacked) parameters; returns the HF names used.

        Unknown names raise KeyError and shape mismatches ValueError, so a wrong checkpoint is
        never half-loaded silently. Buffers HF saves (rotary inv_freq) and a redundant
        lm_head of tied models are skipped.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            target, shard = name, None
            for hf, (ours, idx) in _STACKED.items():
                if f".{hf}." in name:
                    target, shard = name.replace(hf, ours), idx
                    break
            if target not in params:
                raise KeyError(f"unexpected weight {name!r}")
            param = params[target]
            with torch.no_grad():
                if shard is None:
                    dst = param
                else:
                    dst = param.narrow(0, *self._shard_range(target, shard))
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(tensor)
            loaded.add(name)
        return loaded

    def expected_weight_names(self) -> set[str]:
        """The HF names load_weights needs to fill every parameter."""
        out: set[str] = set()
        for name, _ in self.named_parameters():
            parts = [hf for hf, (ours, _i) in _STACKED.items() if f".{ours}." in name]
            if parts:
                ours = _STACKED[parts[0]][0]
                out.update(name.replace(ours, hf) for hf in parts)
            else:
                out.add(name)
        return out

    def _shard_range(self, param_name: str, shard: int) -> tuple[int, int]:
        a = self.arch
        if "qkv_proj" in param_name:
            q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
            return [(0, q), (q, kv), (q + kv, kv)][shard]
        i = a.intermediate_size
        return (shard * i, i)

    @torch.no_grad()
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights in place (std ~0.02, norms 1, biases 0), in the params' own dtype/device.

        Uniform on [-a, a] with a = 0.02 * sqrt(3) has std 0.02 and is much cheaper to draw
        than a normal, which matters for 8B-parameter dummy models.
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)
        bound = 0.02 * math.sqrt(3.0)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.uniform_(-bound, bound, generator=gen)

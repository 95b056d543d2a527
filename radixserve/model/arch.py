"""Model shape: everything the forward pass and the KV pool need to know about a checkpoint."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

# HF `architectures` names we can run, mapped to the family traits the forward pass needs.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# HF `model_type` -> architecture name, for configs that omit `architectures`.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class ModelArch:
    """The shape of a Llama-family decoder (Llama, Mistral, SmolLM, Qwen2, Qwen3).

    rope_scaling is None for plain RoPE, else a dict with "rope_type" ("linear" or "llama3")
    and that type's parameters, as in HF configs (e.g. factor, low_freq_factor, ...).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"unsupported RoPE scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )

    @property
    def rope_type(self) -> str:
        """"default", "linear" or "llama3"."""
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def kv_bytes_per_token(self, dtype: torch.dtype | str) -> int:
        """Bytes of K and V cache one token takes across all layers."""
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        total = v * h + self.num_layers * per_layer + h
        if not self.tie_word_embeddings:
            total += v * h
        return total

    def replace(self, **changes: Any) -> ModelArch:
        """A copy with some fields changed (e.g. a smaller max_position_embeddings)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArch:
        """Build from a Hugging Face config.json dict.

        Understands both the transformers 4.x layout (rope_theta + rope_scaling) and 5.x
        (rope_parameters). Raises ValueError for architectures or features we cannot run.
        """
        archs = config.get("architectures") or []
        architecture = archs[0] if archs else _MODEL_TYPES.get(str(config.get("model_type")), "")
        if architecture not in SUPPORTED_ARCHITECTURES:
            shown = architecture or f"model_type={config.get('model_type')!r}"
            raise ValueError(
                f"unsupported architecture {shown} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if config.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {act!r} (only silu)")
        partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        if config.get("partial_rotary_factor", partial) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")

        num_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // num_heads

        # transformers 5 moved rope_theta and the scaling dict into one `rope_parameters` dict.
        rope_params = config.get("rope_parameters")
        if isinstance(rope_params, dict) and "rope_theta" in rope_params:
            rope_theta = float(rope_params["rope_theta"])
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        else:
            rope_theta = float(config.get("rope_theta", 10000.0))
            scaling = dict(config.get("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = {}

        family = architecture
        return cls(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rope_scaling=scaling or None,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and its config has no flag for it.
            attention_bias=family == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            qk_norm=family == "Qwen3ForCausalLM",
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict transformers would read for this shape (used by tests)."""
        model_type = {v: k for k, v in _MODEL_TYPES.items()}[self.architecture]
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope.update(self.rope_scaling or {})
        return {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
        }


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """"float32" / "fp32" / "bfloat16" / "bf16" / "float16" / "fp16" -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (use float32, bfloat16 or float16)") from None


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Shapes for "dummy:<preset>" random-weight models. The real ones match the published configs so
# benchmarks see realistic matmul and KV sizes; "tiny" is for fast tests (vocab matches the
# embedded SmolLM2 tokenizer so its ids fit).
PRESETS: dict[str, ModelArch] = {
    "tiny": ModelArch(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": ModelArch(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": ModelArch(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE),
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "llama3-8b": ModelArch(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}


def preset(name: str) -> ModelArch:
    """A copy of a named preset shape; ValueError lists the known names."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown dummy preset {name!r} (known: {', '.join(PRESETS)})") from None

"""ModelArch: presets, HF config parsing, KV sizing, RoPE frequencies."""

from __future__ import annotations

import pytest
import torch

from radixserve.model.arch import PRESETS, ModelArch, parse_dtype, preset
from radixserve.model.llama import rope_inv_freq


def test_presets_have_real_shapes():
    assert set(PRESETS) >= {"tiny", "smollm2-135m", "llama3.2-1b", "llama3-8b"}
    tiny = preset("tiny")
    assert (tiny.num_layers, tiny.hidden_size) == (2, 64)
    s = preset("smollm2-135m")
    assert 134e6 < s.num_params() < 136e6
    l1 = preset("llama3.2-1b")
    assert 1.2e9 < l1.num_params() < 1.3e9 and l1.rope_type == "llama3"
    l8 = preset("llama3-8b")
    assert 8.0e9 < l8.num_params() < 8.1e9
    # presets hand out copies: mutating one never leaks into the next
    l1.rope_scaling["factor"] = 1.0
    assert preset("llama3.2-1b").rope_scaling["factor"] == 32.0
    with pytest.raises(ValueError, match="known"):
        preset("nope")


def test_kv_bytes_per_token():
    a = preset("llama3-8b")
    assert a.kv_bytes_per_token(torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    assert a.kv_bytes_per_token("float32") == 2 * 32 * 8 * 128 * 4


def test_from_hf_config_variants():
    base = {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
    }
    # transformers 4.x layout
    a = ModelArch.from_hf_config(
        {**base, "architectures": ["LlamaForCausalLM"], "rope_theta": 5e5,
         "rope_scaling": {"type": "linear", "factor": 2.0}}  # fmt: skip
    )
    assert a.head_dim == 16 and a.rope_theta == 5e5 and a.rope_type == "linear" and not a.attention_bias
    # transformers 5.x layout
    b = ModelArch.from_hf_config(
        {**base, "architectures": ["LlamaForCausalLM"],
         "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}  # fmt: skip
    )
    assert b.rope_scaling is None and b.rope_theta == 1e4
    q2 = ModelArch.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert q2.attention_bias and not q2.qk_norm
    q3 = ModelArch.from_hf_config({**base, "model_type": "qwen3", "head_dim": 32})
    assert q3.qk_norm and q3.head_dim == 32 and q3.architecture == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelArch.from_hf_config({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="RoPE"):
        ModelArch.from_hf_config({**base, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}})


def test_rope_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},  # fmt: skip
    ):
        arch = preset("llama3.2-1b").replace(rope_scaling=scaling)
        cfg = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k not in ("architectures", "model_type")})
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
        torch.testing.assert_close(rope_inv_freq(arch), ref, rtol=0, atol=0)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError):
        parse_dtype("int8")

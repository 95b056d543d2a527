"""The embedded SmolLM2 GGUF through our loader vs transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

PROMPT_MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow, briefly."}]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def hf_reference(embedded_gguf):
    """transformers' LlamaForCausalLM with config and weights from transformers' own GGUF
    parser (its dequantization and Q/K un-permutation), fp32."""
    import importlib.util

    import transformers

    folder, name = str(embedded_gguf.parent), embedded_gguf.name
    if importlib.util.find_spec("accelerate") is not None:  # from_pretrained(gguf_file=) needs it
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # load_gguf_checkpoint wants a model only for its parameter names; a meta-device Llama of any
    # size gives them. Its parsed config then builds the real reference.
    with torch.device("meta"):
        probe = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=30))
    parsed = load_gguf_checkpoint(str(embedded_gguf), return_tensors=True, model_to_load=probe)
    cfg = transformers.LlamaConfig(**parsed["config"])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its buffers were built on meta
    for name_, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu", name_
    return model.eval()


@pytest.mark.slow
def test_weights_match_transformers_dequantization(embedded_loaded, hf_reference):
    ours = embedded_loaded.model
    ref = dict(hf_reference.named_parameters())
    a = embedded_loaded.arch
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    for i in (0, a.num_layers - 1):
        qkv = ours.model.layers[i].self_attn.qkv_proj.weight
        p = f"model.layers.{i}."
        torch.testing.assert_close(qkv[:q], ref[p + "self_attn.q_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(qkv[q : q + kv], ref[p + "self_attn.k_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(qkv[q + kv :], ref[p + "self_attn.v_proj.weight"], rtol=0, atol=0)
        gate_up = ours.model.layers[i].mlp.gate_up_proj.weight
        torch.testing.assert_close(gate_up[: a.intermediate_size], ref[p + "mlp.gate_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours.model.embed_tokens.weight, ref["model.embed_tokens.weight"], rtol=0, atol=0)


@pytest.mark.slow
def test_embedded_logits_match_transformers(embedded_loaded, hf_reference, paged_logits):
    tok = embedded_loaded.tokenizer
    ids = tok.encode(tok.apply_chat_template(PROMPT_MESSAGES))
    assert 25 <= len(ids) <= 60
    with torch.no_grad():
        ref = hf_reference(torch.tensor([ids])).logits[0].float()
    n = len(ids)
    schedules = {"prefill": None, "chunked": [17, n - 17], "decode": [17] + [1] * (n - 17)}
    for label, chunks in schedules.items():
        ours = paged_logits(embedded_loaded.model, ids, chunks, block_size=16)
        err = rel_err(ours, ref)
        assert err < 1e-4, f"{label}: rel err {err:.2e}"
    # and the model actually answers sensibly (greedy argmax of the last position)
    assert tok.decode([int(ref[-1].argmax())]).strip() != ""


def test_embedded_identity(embedded_loaded):
    lm = embedded_loaded
    assert lm.model_id == "SmolLM2-135M-Instruct"
    assert lm.arch.num_layers == 30 and lm.arch.hidden_size == 576 and lm.arch.tie_word_embeddings
    assert lm.arch.rope_theta == 100000.0 and lm.arch.num_kv_heads == 3
    assert lm.max_model_len == 8192
    assert len(lm.fingerprint) == 16 and lm.cache_identity.startswith("SmolLM2-135M-Instruct@")


@pytest.mark.slow
def test_embedded_greedy_answer(embedded_loaded):
    """Greedy decode through the paged cache gives a correct, EOS-terminated answer."""
    from radixserve.model.attention import AttentionMetadata, KVCache

    lm = embedded_loaded
    tok = lm.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    bs = 16
    kv = KVCache.allocate(lm.arch, 8, bs, torch.float32, "cpu")
    table = [5, 2, 7, 0, 3, 6]
    logits = lm.model.compute_logits(lm.model(torch.tensor(ids), AttentionMetadata.build([table], [0], [len(ids)], bs), kv)[-1:])
    out: list[int] = []
    for _ in range(20):
        nxt = int(logits.argmax())
        if nxt in tok.eos_token_ids:
            break
        out.append(nxt)
        meta = AttentionMetadata.build([table], [len(ids) + len(out) - 1], [1], bs)
        logits = lm.model.compute_logits(lm.model(torch.tensor([nxt]), meta, kv))
    assert "Paris" in tok.decode(out)
    assert nxt in tok.eos_token_ids

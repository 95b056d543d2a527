"""Tiny random Llama-3 / Qwen2 / Qwen3 checkpoints written by transformers, loaded through our
HF-folder path, must give transformers' logits (single prefill, chunked prefill, decode)."""

from __future__ import annotations

import json

import pytest
import torch

from radixserve.config import ModelConfig
from radixserve.model.attention import AttentionMetadata, KVCache
from radixserve.model.loader import load_model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


VOCAB = 49152  # the embedded tokenizer's vocabulary, saved alongside as tokenizer.json

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so low-, mid- and high-frequency bands all occur at head_dim 16.
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 32}),
}


def _make_checkpoint(folder, case: str, tokenizer, shard: bool = False):
    import transformers

    cfg_name, model_name, extra = CASES[case]
    extra = dict(extra)
    head_dim = extra.pop("head_dim", 16)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        **extra,
    )
    torch.manual_seed(hash(case) % 1000)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms (incl. Qwen3 q_norm/k_norm) away from 1 so they matter
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):  # Qwen2 q/k/v bias
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size="2MB" if shard else "5GB")
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": tokenizer.chat_template})
    )
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, embedded_tokenizer):
    """case -> (folder, transformers model)."""
    out = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case)
        out[case] = (folder, _make_checkpoint(folder, case, embedded_tokenizer, shard=case == "qwen2"))
    return out


def _ids(n: int = 30, seed: int = 0) -> list[int]:
    return torch.randint(100, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_folder_logits_match_transformers(case, checkpoints, paged_logits):
    folder, ref_model = checkpoints[case]
    loaded = load_model(ModelConfig(source=str(folder), show_progress=False))
    assert loaded.model_id == folder.name
    assert loaded.arch.architecture == CASES[case][1]
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    n = len(ids)
    for chunks in (None, [17, n - 17], [17] + [1] * (n - 17)):
        ours = paged_logits(loaded.model, ids, chunks)
        err = rel_err(ours, ref)
        assert err < 1e-4, f"{case} chunks={chunks}: rel err {err:.2e}"


def test_sharded_checkpoint_was_sharded(checkpoints):
    folder, _ = checkpoints["qwen2"]
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1


def test_tokenizer_from_folder(checkpoints, embedded_tokenizer):
    folder, _ = checkpoints["qwen3"]
    loaded = load_model(ModelConfig(source=str(folder), show_progress=False))
    tok = loaded.tokenizer
    text = "<|im_start|>user\nhi 123<|im_end|>"
    assert tok.encode(text) == embedded_tokenizer.encode(text)
    assert tok.chat_template == embedded_tokenizer.chat_template
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids


def test_batched_sequences_match_individual(checkpoints, paged_logits):
    """One flattened step with a fresh prefill, a chunk after a cached prefix and two decodes
    gives each sequence the logits it gets alone."""
    folder, _ = checkpoints["qwen3"]
    model = load_model(ModelConfig(source=str(folder), show_progress=False)).model
    seqs = [_ids(23, 1), _ids(19, 2), _ids(9, 3), _ids(14, 4)]
    cached = [0, 11, 8, 13]  # tokens of each already in the cache before the batched step
    alone = [paged_logits(model, s) for s in seqs]

    bs = 4
    per_seq_blocks = [(len(s) + bs - 1) // bs for s in seqs]
    pool = sum(per_seq_blocks) + 4
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(7)).tolist()
    tables = [[perm.pop() for _ in range(nb)] for nb in per_seq_blocks]
    kv = KVCache.allocate(model.arch, pool, bs, torch.float32, "cpu")
    # Earlier steps: fill each cached prefix (one prefill per sequence).
    for s, c, t in zip(seqs, cached, tables):
        if c:
            model(torch.tensor(s[:c]), AttentionMetadata.build([t], [0], [c], bs), kv)
    meta = AttentionMetadata.build(tables, cached, [len(s) - c for s, c in zip(seqs, cached)], bs)
    ids = torch.tensor([tok for s, c in zip(seqs, cached) for tok in s[c:]])
    logits = model.compute_logits(model(ids, meta, kv))
    start = 0
    for s, c, ref in zip(seqs, cached, alone):
        n = len(s) - c
        torch.testing.assert_close(logits[start : start + n], ref[c:], atol=1e-5, rtol=1e-4)
        start += n


def test_bfloat16_load(checkpoints, paged_logits):
    folder, ref_model = checkpoints["llama3"]
    loaded = load_model(ModelConfig(source=str(folder), dtype="bfloat16", show_progress=False))
    assert loaded.model.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    assert loaded.cache_identity.endswith("/bfloat16")
    ids = _ids()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    ours = paged_logits(loaded.model, ids, [17, len(ids) - 17])
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) < 3e-2

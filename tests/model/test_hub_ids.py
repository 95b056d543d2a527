"""`--model org/name` resolves through huggingface_hub's standard cache. The test writes a tiny
checkpoint into a local hub cache layout (models--org--name/refs + snapshots/<commit>); with
HF_HUB_OFFLINE=1 nothing is downloaded, and an id missing from the cache is a clear error."""

from __future__ import annotations

import pytest

from radixserve.config import ModelConfig
from radixserve.errors import ModelLoadError
from radixserve.model.loader import is_hub_id, load_model
from tests.model.test_hf_checkpoints import _make_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, embedded_tokenizer):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    _make_checkpoint(snapshot, "llama3", embedded_tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_loads_from_the_cache_offline(hub_cache):
    loaded = load_model(ModelConfig(source="acme/tiny-llama", dtype="float32", show_progress=False))
    assert loaded.model_id == "acme/tiny-llama"
    assert loaded.arch.num_layers == 2
    same = load_model(ModelConfig(source=f"acme/tiny-llama@{COMMIT}", dtype="float32", show_progress=False))
    assert same.fingerprint == loaded.fingerprint


def test_missing_hub_id_names_the_id(hub_cache):
    with pytest.raises(ModelLoadError, match="'acme/absent'.*HF_HUB_OFFLINE"):
        load_model(ModelConfig(source="acme/absent", show_progress=False))


def test_what_counts_as_a_hub_id():
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("meta-llama/Llama-3.2-1B@main")
    assert not is_hub_id("embedded") and not is_hub_id("./a/b") and not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c")

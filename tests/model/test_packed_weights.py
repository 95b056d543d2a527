"""CPU linear layers on oneDNN-packed weights (ModelConfig.cpu_packed_weights)."""

from __future__ import annotations

import pytest
import torch

from radixserve.config import CacheConfig, EngineConfig, ModelConfig
from radixserve.engine import LLMEngine
from radixserve.model.attention import AttentionMetadata, KVCache
from radixserve.model.llama import Linear, packing_supported
from radixserve.model.loader import load_model

pytestmark = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                reason="torch without oneDNN")  # fmt: skip


def _logits(loaded, ids: list[int]) -> torch.Tensor:
    kv = KVCache.allocate(loaded.arch, 8, 16, torch.float32, "cpu")
    meta = AttentionMetadata.build([[3, 1, 4, 0]], [0], [len(ids)], 16)
    return loaded.model.compute_logits(loaded.model(torch.tensor(ids), meta, kv))


def test_packed_logits_match_plain_and_packing_follows_the_weights():
    loaded = load_model(ModelConfig(source="dummy:tiny", show_progress=False))
    model, ids = loaded.model, list(range(5, 45))
    plain = _logits(loaded, ids)
    assert model.set_packed_weights(True)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed_weight is not None for m in linears) and model.packed_lm_head is not None
    torch.testing.assert_close(_logits(loaded, ids), plain, atol=1e-4, rtol=1e-4)
    first = linears[0].packed_weight
    model.set_packed_weights(True)  # a second engine on the same model: the packing is reused
    assert linears[0].packed_weight is first
    with torch.no_grad():  # ...unless the weight changed since
        linears[0].weight.mul_(0.5)
    model.set_packed_weights(True)
    assert linears[0].packed_weight is not first
    x = torch.randn(3, linears[0].in_features)
    torch.testing.assert_close(linears[0](x), torch.nn.functional.linear(x, linears[0].weight), atol=1e-5, rtol=1e-5)
    assert not model.set_packed_weights(False)
    assert all(m.packed_weight is None for m in linears) and model.packed_lm_head is None


@pytest.mark.parametrize("options,packed", [({}, True), ({"cpu_packed_weights": False}, False),
                                            ({"deterministic": True}, False)])  # fmt: skip
def test_engine_packs_unless_turned_off_or_deterministic(options, packed):
    loaded = load_model(ModelConfig(source="dummy:tiny", show_progress=False))
    config = EngineConfig(model=ModelConfig(source="dummy:tiny", show_progress=False, **options),
                          cache=CacheConfig(num_blocks=32))  # fmt: skip
    LLMEngine(config, loaded=loaded)
    assert (loaded.model.packed_lm_head is not None) == packed

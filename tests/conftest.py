"""Shared fixtures: the embedded model is loaded once per test session."""

from __future__ import annotations

import pytest

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tests.redis_server import redis_server  # noqa: F401  (fixture: a fresh redis-server per test)


@pytest.fixture(scope="session")
def embedded_model():
    from radixserve.model.loader import load_model

    return load_model(ModelConfig(source="embedded", show_progress=False))


@pytest.fixture
def make_engine(embedded_model):
    """Build an engine over the already loaded embedded model with the given knobs."""
    from radixserve.engine import LLMEngine

    def make(
        *,
        num_blocks: int | None = 256,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        policy: str = "fcfs",
        kv_store: str | None = None,
        kv_store_gb: float = 1.0,
        reuse_partial_blocks: bool = False,
    ) -> LLMEngine:
        config = EngineConfig(
            model=ModelConfig(source="embedded", show_progress=False),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching,
                              kv_store=kv_store, kv_store_gb=kv_store_gb, reuse_partial_blocks=reuse_partial_blocks),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, policy=policy
            ),
        )
        engine = LLMEngine(config, loaded=embedded_model)
        engines.append(engine)
        return engine

    engines = []
    yield make
    for engine in engines:  # a disk store's directory lock goes with its engine
        engine.close()


def run_to_completion(engine, request_ids=None, max_steps: int = 100_000) -> dict:
    """Step the engine until every request finished; returns {request_id: final RequestOutput}."""
    finished = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        steps += 1
        assert steps < max_steps, "engine made no progress"
    return finished

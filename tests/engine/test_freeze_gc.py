"""SchedulerConfig.freeze_gc: the start-up heap leaves the garbage collector's view while the
engine serves (the same tokens), and comes back when it closes."""

from __future__ import annotations

import gc

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.engine import LLMEngine
from radixserve.sampling import SamplingParams
from tests.conftest import run_to_completion


def _generate(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i in range(4):
        engine.add_request([5 + i, 17, 23, 42, 7 * i + 3], params, request_id=str(i))
    outs = run_to_completion(engine)
    return [outs[str(i)].token_ids for i in range(4)]


def _engine(freeze: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(source="dummy:tiny", dtype="float32", show_progress=False),
                                  cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(freeze_gc=freeze)))


def test_freeze_gc_freezes_the_start_up_heap_until_close():
    gc.unfreeze()
    plain = _engine(False)
    assert gc.get_freeze_count() == 0
    expected = _generate(plain)
    plain.close()
    frozen = _engine(True)
    try:
        assert gc.get_freeze_count() > 1000  # the model, the tokenizer, torch's and our modules
        assert _generate(frozen) == expected
    finally:
        frozen.close()
    assert gc.get_freeze_count() == 0

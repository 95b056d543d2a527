"""GPU: after the start-up warm-up (radixserve/warmup.py), serving steps of any shape launch only
kernel variants that are already compiled, and the warm-up leaves no trace in what is served."""

from __future__ import annotations

import random
import sys

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu


def launchers() -> list:
    """The runner's Triton launchers: each keeps one entry per kernel variant it has launched."""
    module = sys.modules["radixserve.model.triton_kernels"]
    return [v for v in vars(module).values() if isinstance(v, module._Launcher)]


def kernel_variants() -> int:
    return sum(len(launcher.cache) for launcher in launchers())


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="dummy:tiny", dtype="bfloat16", device="cuda", show_progress=False))


def engine(loaded, warmup: bool) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="bfloat16", device="cuda", max_model_len=2048,
                          kernel_warmup=warmup, show_progress=False),
        cache=CacheConfig(num_blocks=1024),
        # 96 rows: a decode launch of >= 66 rows (2 KV heads) fills the GPU unsplit
        scheduler=SchedulerConfig(max_num_seqs=96, max_num_batched_tokens=512),
    )
    return LLMEngine(config, loaded=loaded)


def serve(engine: LLMEngine) -> list[list[int]]:
    """Requests of every length parity over shared prefixes: fresh prefills, chunked prefills,
    suffixes over cached prefixes, mixed and decode-only steps of changing sizes; then 90 short
    distinct prompts at once: mixed steps of up to ~90 decode rows sharing no prefix (no cascade)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 250) for _ in range(n)] for n in (37, 300, 1200)]
    outs = {}

    def step():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.token_ids

    for i in range(40):
        prompt = prefixes[i % 3][: rng.randrange(1, 1200)] + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 90))]
        params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0, ignore_eos=True)
        engine.add_request(prompt, params, request_id=str(i))
        if i % 7 == 0:  # arrivals spread over the steps
            step()
    while engine.has_unfinished_requests():
        step()
    for i in range(40, 130):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(8, 40))]
        engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(8, 16), temperature=0, ignore_eos=True), request_id=str(i))
    while engine.has_unfinished_requests():
        step()
    engine.check_cache_invariants()
    return [outs[str(i)] for i in range(130)]


def test_no_kernel_compiles_while_serving_after_warmup_and_same_tokens(loaded):
    for launcher in launchers():  # forget what earlier tests launched: count from here
        launcher.cache.clear()
    warm_engine = engine(loaded, warmup=True)
    before = kernel_variants()
    assert before > 0 and warm_engine.startup_seconds["kernel_warmup"] > 0
    warm = serve(warm_engine)
    assert kernel_variants() == before, "a serving step launched a kernel variant the warm-up missed"
    cold = serve(engine(loaded, warmup=False))
    assert warm == cold  # the warm-up's synthetic steps leave nothing behind in the pool

"""n > 1 on the GPU path: forked block tables and the copy-on-write block copies under CUDA
graphs and eager, against each choice run alone. Skipped without a CUDA device and Triton.

    .venv/bin/python -m pytest tests/engine/test_n_choices_cuda.py -q -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.request import choice_request_ids  # noqa: E402
from radixserve.sampling import SamplingParams, choice_seed  # noqa: E402
from tests.conftest import run_to_completion  # noqa: E402

pytestmark = pytest.mark.gpu

PROMPT = list(range(5, 5 + 37))  # 37 tokens: two full 16-token blocks and a shared partial one


@pytest.fixture(scope="module")
def tiny_fp32():
    return load_model(ModelConfig(source="dummy:tiny", dtype="float32", device="cuda", show_progress=False))


def _engine(loaded, *, eager: bool, caching: bool) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32", device="cuda", enforce_eager=eager, max_model_len=1024),
        cache=CacheConfig(num_blocks=512, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=16),
    )
    return LLMEngine(config, loaded=loaded)


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_forked_choices_match_solo_runs_on_gpu(tiny_fp32, eager, caching):
    solo = _engine(tiny_fp32, eager=eager, caching=False)
    expected = []
    for i in range(4):
        solo.add_request(PROMPT, SamplingParams(max_tokens=24, temperature=1.0, seed=choice_seed(5, i), ignore_eos=True),
                         request_id=f"s{i}")
        expected.append(run_to_completion(solo)[f"s{i}"].token_ids)

    engine = _engine(tiny_fp32, eager=eager, caching=caching)
    engine.add_request(PROMPT, SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True, n=4),
                       request_id="r")
    outs = run_to_completion(engine)
    assert [outs[rid].token_ids for rid in choice_request_ids("r", 4)] == expected
    assert engine.stats.computed_prompt_tokens == len(PROMPT)
    snap = engine.snapshot()
    assert snap.copied_blocks == 3
    assert snap.free_blocks + snap.cached_blocks == snap.total_blocks

"""The GPU engine: CUDA-graph decode against eager decode, and prefix caching on the GPU path.

Skipped without a CUDA device and Triton (CI); run on the GPU machine by bench/bench_gpu.py.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from radixserve.engine import LLMEngine  # noqa: E402
from radixserve.model.loader import load_model  # noqa: E402
from radixserve.sampling import SamplingParams  # noqa: E402
from tests.conftest import run_to_completion  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny_fp32():
    # fp32 (no TF32 in matmuls, IEEE dots in the kernels): graph and eager must agree exactly
    # enough that greedy picks never flip.
    return load_model(ModelConfig(source="dummy:tiny", dtype="float32", device="cuda", show_progress=False))


def _engine(loaded, *, eager: bool, caching: bool = True, max_num_seqs: int = 16) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32", device="cuda", enforce_eager=eager, max_model_len=1024),
        cache=CacheConfig(num_blocks=512, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
    )
    return LLMEngine(config, loaded=loaded)


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    return [shared[: rng.randrange(0, 40)] + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), request_id=str(i))
    outs = run_to_completion(engine)
    return [outs[str(i)].token_ids for i in range(len(prompts))]


def test_graph_decode_matches_eager(tiny_fp32):
    prompts = _prompts(11, tiny_fp32.arch.vocab_size)  # 11: padded to a captured size
    graphs = _engine(tiny_fp32, eager=False)
    assert graphs.cuda_graphs
    eager = _engine(tiny_fp32, eager=True)
    assert not eager.cuda_graphs
    assert _generate(graphs, prompts) == _generate(eager, prompts)


def test_prefix_caching_on_gpu_matches_uncached(tiny_fp32):
    prompts = _prompts(20, tiny_fp32.arch.vocab_size, seed=1)
    cached = _engine(tiny_fp32, eager=False, caching=True)
    first = _generate(cached, prompts[:1])
    rest = _generate(cached, prompts)
    plain = _generate(_engine(tiny_fp32, eager=False, caching=False), prompts)
    assert rest == plain and first[0] == plain[0]
    assert cached.snapshot().prefix_cache_hits > 0


def test_single_prefill_graph_matches_eager(tiny_fp32):
    """One request at a time: each prefill (over the cached shared prefix) replays a prefill
    graph, padded to its token bucket."""
    prompts = _prompts(6, tiny_fp32.arch.vocab_size, seed=2)
    graphs = _engine(tiny_fp32, eager=False)
    assert graphs.cuda_graphs  # decode and prefill graphs are captured together
    eager = _engine(tiny_fp32, eager=True)
    for p in prompts:
        assert _generate(graphs, [p]) == _generate(eager, [p])


def test_cascade_attention_matches_plain(tiny_fp32):
    """Groups of requests over long shared prefixes: decode rows read each prefix once per group
    (cascade attention, in the decode graphs and in eager mixed steps); the greedy tokens are
    those of plain attention."""
    rng = random.Random(3)
    vocab = tiny_fp32.arch.vocab_size
    prompts = []
    for group, prefix_len in enumerate((300, 420)):  # groups of CASCADE_MIN_ROWS rows and more
        prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
        prompts += [prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(10)]

    def run(cascade: bool, eager: bool) -> tuple[list[list[int]], int]:
        config = EngineConfig(
            model=ModelConfig(source="dummy:tiny", dtype="float32", device="cuda", enforce_eager=eager,
                              max_model_len=1024, cascade_attention=cascade),
            cache=CacheConfig(num_blocks=512),
            scheduler=SchedulerConfig(max_num_seqs=32),
        )  # fmt: skip
        engine = LLMEngine(config, loaded=tiny_fp32)
        _generate(engine, [p[:-1] for p in prompts[::10]])  # the shared prefixes, cached
        return _generate(engine, prompts, max_tokens=16), engine.cascade_rows

    plain, plain_rows = run(cascade=False, eager=False)
    graphs, graph_rows = run(cascade=True, eager=False)
    eager, eager_rows = run(cascade=True, eager=True)
    assert plain_rows == 0 and graph_rows > 0 and eager_rows > 0
    assert graphs == plain and eager == plain

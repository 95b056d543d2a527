"""The decode CUDA graphs' host half (DecodeGraphs.fill) on the CPU, step after step of a real
engine run: its buffer must hold exactly what a fresh build of each step gives (the block tables
padded_block_tables builds, the cascade plan_cascade plans), although it rewrites only the table
rows that changed and reuses the previous step's plan when no row changed."""

from __future__ import annotations

import random

import numpy as np
import torch

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.cuda_graphs import DecodeGraphs
from radixserve.engine import LLMEngine
from radixserve.model.attention import padded_block_tables
from radixserve.model.cascade import CASCADE_MIN_BLOCKS, CASCADE_ROWS, max_chunks, plan_cascade
from radixserve.sampling import SamplingParams
from radixserve.step import StepInput
from tests.conftest import run_to_completion

BLOCK_SIZE = 4


def test_fill_matches_a_fresh_build_every_decode_step(monkeypatch):
    import radixserve.cuda_graphs

    planned = []
    monkeypatch.setattr(radixserve.cuda_graphs, "plan_cascade", lambda *a, **k: planned.append(1) or plan_cascade(*a, **k))
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(source="dummy:tiny", dtype="float32", show_progress=False, max_model_len=256),
        cache=CacheConfig(num_blocks=1024, block_size=BLOCK_SIZE),
        scheduler=SchedulerConfig(max_num_seqs=24, max_num_batched_tokens=512, policy="group"),
    ))  # fmt: skip
    runner = engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_cache, BLOCK_SIZE, 24, 256, cascade=True)
    o, width = graphs._offsets, graphs.width
    execute = runner.execute
    checked = {"steps": 0, "cascade": 0}

    def view(name: str, n: int) -> list[int]:
        return graphs._np[o[name] : o[name] + n].tolist()

    def checking_execute(step):
        if step.is_decode:
            size, with_cascade, _ = graphs.fill(step)
            B = step.num_seqs
            assert view("ids", B) == step.token_ids and view("pos", B) == step.positions
            assert view("slots", B) == step.slot_mapping and view("seq_lens", B) == step.seq_lens
            tables = graphs._np[o["tables"] : o["tables"] + size * width].reshape(size, width)[:B]
            expected = padded_block_tables(step)
            assert np.array_equal(tables[:, : step.max_blocks], expected) and not tables[:, step.max_blocks :].any()
            plan = plan_cascade(expected, np.asarray(step.seq_lens), BLOCK_SIZE) if size >= 4 else None
            assert with_cascade == (plan is not None)
            if plan is not None:
                used = plan.num_chunks
                assert view("row_prefix", size) == plan.row_prefix.tolist() + [0] * (size - B)
                assert view("chunk_rows", used * CASCADE_ROWS) == plan.chunk_rows.reshape(-1).tolist()
                assert view("chunk_prefix", max_chunks(size)) == plan.chunk_prefix.tolist() + [0] * (max_chunks(size) - used)
                assert view("chunk_leader", used) == plan.chunk_leader.tolist()
                checked["cascade"] += 1
            checked["steps"] += 1
        return execute(step)

    runner.execute = checking_execute
    rng = random.Random(0)
    vocab = engine.loaded.arch.vocab_size
    prefixes = [[rng.randrange(3, vocab) for _ in range(CASCADE_MIN_BLOCKS * BLOCK_SIZE + 6)] for _ in range(3)]
    with torch.inference_mode():
        for i in range(40):  # three groups sharing a long prefix, arriving shuffled, outputs of many lengths
            prompt = rng.choice(prefixes) + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9))]
            engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(2, 40), temperature=0, ignore_eos=True))
        run_to_completion(engine)
    assert checked["steps"] > 30 and checked["cascade"] > 20 and planned


def test_plan_reused_while_no_row_changes(monkeypatch):
    import radixserve.cuda_graphs

    planned = []
    monkeypatch.setattr(radixserve.cuda_graphs, "plan_cascade", lambda *a, **k: planned.append(1) or plan_cascade(*a, **k))
    engine = LLMEngine(EngineConfig(model=ModelConfig(source="dummy:tiny", dtype="float32", show_progress=False),
                                    cache=CacheConfig(num_blocks=256, block_size=BLOCK_SIZE)))
    graphs = DecodeGraphs(engine.runner.model, engine.runner.kv_cache, BLOCK_SIZE, 8, 128, cascade=True)
    shared = list(range(CASCADE_MIN_BLOCKS))
    tables = [shared + [100 + i] for i in range(8)]  # 8 rows sharing 16 blocks, each in a block of its own

    def fill(position: int):
        step = StepInput.build(BLOCK_SIZE, [([1], position, t, True) for t in tables])
        assert graphs.fill(step)[1]  # the cascade graph
        return graphs._np.copy()

    first = fill(CASCADE_MIN_BLOCKS * BLOCK_SIZE)
    second = fill(CASCADE_MIN_BLOCKS * BLOCK_SIZE + 1)  # one token on, in the same block: the same plan
    assert len(planned) == 1
    cascade_parts = slice(graphs._offsets["row_prefix"], graphs._offsets["tables"])
    assert np.array_equal(first[cascade_parts], second[cascade_parts])
    tables[3] = tables[3][:-1] + [200]  # a row's block swapped: planned again
    fill(CASCADE_MIN_BLOCKS * BLOCK_SIZE + 2)
    assert len(planned) == 2

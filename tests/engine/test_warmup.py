"""Kernel warm-up at start-up and the Triton cache directory (radixserve/warmup.py): the parts
that run without a GPU. The GPU side (every kernel variant compiled before serving, the first
burst as fast as a warm one) is measured by bench/probe_steps.py on a device."""

from __future__ import annotations

import argparse
import os

import pytest

from radixserve.commands.common import add_engine_args, engine_config_from_args
from radixserve.config import CacheConfig, EngineConfig, ModelConfig
from radixserve.cuda_graphs import aligned_offsets
from radixserve.engine import LLMEngine
from radixserve.sampling import SamplingParams
from radixserve.warmup import PREFILL_QUERY_LENS, triton_cache_dir, warmup_shapes, warmup_step


def test_aligned_offsets_start_every_part_on_16_bytes_without_overlap():
    for sizes in ([1, 1, 1], [3, 8, 5, 2], [0, 7, 0, 1], [4096, 33, 34, 129]):
        offsets, total = aligned_offsets(sizes)
        assert all(o % 2 == 0 for o in offsets)  # int64: an even index is a 16-byte boundary
        ends = [o + n for o, n in zip(offsets, sizes)]
        assert all(end <= nxt for end, nxt in zip(ends, offsets[1:])) and ends[-1] <= total


@pytest.mark.parametrize("max_seqs,budget,context", [(128, 4096, 8192), (64, 2048, 2048), (4, 64, 256)])
def test_warmup_shapes_stay_within_what_the_scheduler_can_make(max_seqs, budget, context):
    shapes = warmup_shapes(max_seqs, budget, context)
    assert len(shapes) == len(set(shapes))
    for s in shapes:
        assert 0 < s.num_seqs <= max_seqs and s.num_tokens <= budget
        assert all(q + c <= context for q, c in s.prefills)
    assert any(s.num_tokens == budget and not s.decodes for s in shapes)  # the largest GEMMs, fresh
    assert any(s.num_tokens > budget // 2 and s.decodes and all(c for _, c in s.prefills) for s in shapes)
    # decodes beside a suffix, with and without a shared context for cascade attention
    suffix = PREFILL_QUERY_LENS[0]
    mixed = [(s.decodes, s.short_decodes) for s in shapes if s.decodes and [q for q, _ in s.prefills] == [suffix]]
    assert {d for d, short in mixed if short} == {d for d, short in mixed if not short} != set()
    decode_only = [s.decodes for s in shapes if not s.prefills]
    assert max_seqs in decode_only and 1 in decode_only
    # every prefill length that fits is tried fresh and over a cached prefix, alone and mixed
    for q in (q for q in PREFILL_QUERY_LENS if q <= budget and q < context):
        kinds = {(s.decodes > 0, c > 0) for s in shapes for qq, c in s.prefills if qq == q}
        assert (False, False) in kinds and (False, True) in kinds
        if q < budget:
            assert (True, False) in kinds and (True, True) in kinds


@pytest.mark.parametrize("budget,context", [(4096, 8192), (2048, 2048), (512, 8192)])
def test_warmup_runs_every_length_fresh_attention_rounds_to(budget, context):
    plain = warmup_shapes(128, budget, context)
    shapes = warmup_shapes(128, budget, context, fresh_length_step=256)
    assert set(plain) <= set(shapes) and len(shapes) == len(set(shapes))
    assert all(s.num_tokens <= budget and all(q + c <= context for q, c in s.prefills) for s in shapes)
    # one prompt's attention length: its own (fresh), or its context (a chunk over a short prefix)
    lengths = {q + c for s in shapes if not s.decodes and len(s.prefills) == 1 for q, c in s.prefills}
    longest = min(context - 1, budget * 5 // 4)
    assert set(range(256, longest + 1, 256)) <= lengths


def test_warmup_step_is_a_valid_step_over_the_pools_first_blocks():
    for shape in warmup_shapes(8, 512, 1024):
        step = warmup_step(shape, block_size=16, num_blocks=64)
        assert step.num_seqs == shape.num_seqs and step.num_tokens == shape.num_tokens
        assert all(0 <= b < 64 for table in step.block_tables for b in table)
        assert all(0 <= s < 64 * 16 for s in step.slot_mapping)
        assert step.logits_rows == [end - 1 for end in step.query_start_loc[1:]]
        decode_contexts = {len(table) for table, n in zip(step.block_tables, step.query_lens) if n == 1}
        # short decode rows read one block (no cascade); the others 33: 512 tokens + the new one
        assert decode_contexts <= ({1} if shape.short_decodes else {33})


def test_triton_cache_dir_config_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert triton_cache_dir(None) == str(tmp_path / "radixserve" / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    assert triton_cache_dir(None) == "/somewhere/else"
    assert triton_cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_cli_flags_turn_warmup_off_and_move_the_cache():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).model.kernel_warmup is True
    config = engine_config_from_args(parser.parse_args(["--no-kernel-warmup", "--triton-cache-dir", "/tmp/tc"]))
    assert config.model.kernel_warmup is False and config.model.triton_cache_dir == "/tmp/tc"


def test_cpu_engine_skips_the_warmup_and_leaves_triton_alone(monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    engine = LLMEngine(EngineConfig(model=ModelConfig(source="dummy:tiny"), cache=CacheConfig(num_blocks=64)))
    assert "kernel_warmup" not in engine.startup_seconds
    assert engine.startup_seconds["total"] >= engine.startup_seconds["load_model"]
    assert "TRITON_CACHE_DIR" not in os.environ
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()

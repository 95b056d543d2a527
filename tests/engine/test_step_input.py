"""The step's host metadata (radixserve/step.py) against plain reference implementations: the
fast paths that keep it off the critical path between GPU steps must build the same numbers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.model.attention import padded_block_tables
import radixserve.step as step_module
from radixserve.step import BlockTableRows, StepInput, slot_mapping

BLOCK_SIZE = 4


def reference_slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@given(st.lists(st.integers(0, 999), min_size=1, max_size=12, unique=True), st.data())
def test_slot_mapping_matches_reference(block_ids, data):
    capacity = len(block_ids) * BLOCK_SIZE
    start = data.draw(st.integers(0, capacity - 1))
    end = data.draw(st.integers(start + 1, capacity))
    assert slot_mapping(block_ids, start, end, BLOCK_SIZE) == reference_slots(block_ids, start, end, BLOCK_SIZE)


def test_step_input_build_lists():
    step = StepInput.build(BLOCK_SIZE, [
        ([5, 6, 7, 8, 9], 2, [3, 1], False),  # a prefill chunk over a cached head of 2 tokens
        ([42], 6, [7, 2], True),  # a decode at position 6
    ])  # fmt: skip
    assert step.token_ids == [5, 6, 7, 8, 9, 42]
    assert step.positions == [2, 3, 4, 5, 6, 6]
    assert step.slot_mapping == [14, 15, 4, 5, 6, 10]
    assert step.query_start_loc == [0, 5, 6]
    assert step.query_lens == [5, 1]
    assert step.seq_lens == [7, 7]
    assert step.logits_rows == [5]
    assert step.is_decode is False


@given(st.lists(st.tuples(st.lists(st.integers(0, 999), min_size=1, max_size=6), st.integers(0, 23), st.integers(0, 9)),
                max_size=8))
def test_decodes_equal_build(rows):
    tables = [blocks for blocks, _, _ in rows]
    positions = [offset % (len(blocks) * BLOCK_SIZE) for blocks, offset, _ in rows]
    tokens = [token for _, _, token in rows]
    fast = StepInput.decodes(BLOCK_SIZE, tokens, positions, tables, [(1, 2)])
    built = StepInput.build(BLOCK_SIZE, [([t], p, b, True) for t, p, b in zip(tokens, positions, tables)], [(1, 2)])
    assert fast == built
    assert fast.is_decode


# One step after another: each sequence's block list grows, gets a block swapped in place (the
# tree's copy of an identical block), or the rows change order (requests finish, others start).
_edit = st.sampled_from(["grow", "swap", "drop_first", "shuffle", "new_row", "same"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_edit, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_block_table_rows_equal_padded_tables_step_after_step(edits, rng):
    _check_steps(edits, rng)


@settings(max_examples=200, deadline=None)
@given(st.lists(_edit, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_block_table_rows_moved_rows_equal_padded_tables(edits, rng):
    saved, step_module.MOVED_ROWS_MIN = step_module.MOVED_ROWS_MIN, 0  # every write looks for moved rows
    try:
        _check_steps(edits, rng)
    finally:
        step_module.MOVED_ROWS_MIN = saved


def _check_steps(edits, rng):
    rows = BlockTableRows(np.zeros((8, 12), dtype=np.int64))
    live = [[rng.randrange(100) for _ in range(rng.randrange(1, 6))] for _ in range(3)]
    for edit in edits:
        if edit == "grow":
            row = rng.choice(live)
            if len(row) < 12:
                row.append(rng.randrange(100))
        elif edit == "swap":
            row = rng.choice(live)
            row[rng.randrange(len(row))] = rng.randrange(100)  # in place: the same list object
        elif edit == "drop_first" and len(live) > 1:
            live.pop(0)
        elif edit == "shuffle":
            rng.shuffle(live)
        elif edit == "new_row" and len(live) < 8:
            live.append([rng.randrange(100) for _ in range(rng.randrange(1, 12))])
        step = StepInput.build(BLOCK_SIZE, [([1], len(t) * BLOCK_SIZE - 1, t, True) for t in live])
        expected = padded_block_tables(step)
        got = rows.write(step.block_tables)
        assert np.array_equal(got[:, : step.max_blocks], expected)
        assert not got[:, step.max_blocks :].any()  # zero past every row's blocks, to the array's width

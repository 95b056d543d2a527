"""StepInput: one step's host metadata, built once, read by every consumer of the step.

The scheduler builds it from the requests it picked and their KV handles; the runner turns it
into device tensors (CPU and GPU alike), the CUDA graphs copy it into their static buffers, and
the attention backends plan launches from its lengths. No Request, no scheduler types: plain
lists of ints. `slot_mapping` is the one place a token position becomes a KV slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


def slot_mapping(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """KV slots (block_id * block_size + offset) of positions start..end-1 of a sequence whose
    block table is `block_ids`."""
    if end - start == 1:  # a decode's one token (the common case): no loop
        return [block_ids[start // block_size] * block_size + start % block_size]
    # a run of consecutive slots per block: O(blocks) Python steps, not O(tokens) (a step's
    # prefill chunks are thousands of tokens)
    slots: list[int] = []
    for b in range(start // block_size, (end - 1) // block_size + 1):
        base = block_ids[b] * block_size - b * block_size  # slot of position p in block b: base + p
        slots.extend(range(base + max(start, b * block_size), base + min(end, (b + 1) * block_size)))
    return slots


@dataclass(slots=True)
class StepInput:
    """The T new tokens of B sequences in one step.

    Sequence i's new tokens are rows query_start_loc[i]:query_start_loc[i+1] of the token lists;
    they sit at the end of its context of seq_lens[i] tokens, whose K/V live in block_tables[i].
    """

    block_size: int
    token_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T] absolute position of each new token
    slot_mapping: list[int] = field(default_factory=list)  # [T] where its K/V goes
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # [B+1] cumulative new-token counts
    query_lens: list[int] = field(default_factory=list)  # [B] new tokens per sequence
    seq_lens: list[int] = field(default_factory=list)  # [B] context length after this step
    block_tables: list[list[int]] = field(default_factory=list)  # [B] block ids of each sequence
    logits_rows: list[int] = field(default_factory=list)  # rows whose logits are wanted (sampling), in order
    # (src, dst) whole-block K/V copies to apply before the forward writes anything: copy-on-write
    # of a partial block shared by forked choices (n > 1). Empty on almost every step.
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, block_size: int, seqs: Iterable[tuple[Sequence[int], int, list[int], bool]],
              block_copies: list[tuple[int, int]] | None = None) -> StepInput:
        """A step of sequences given as (new token ids, position of the first, block table,
        whether the last new token's logits are wanted). One pass, locals only: a decode step
        has hundreds of sequences and this runs on the critical path of every step."""
        step = cls(block_size, block_copies=block_copies or [])
        ids, positions, slots, tables = step.token_ids, step.positions, step.slot_mapping, step.block_tables
        starts, query_lens, seq_lens, rows = step.query_start_loc, step.query_lens, step.seq_lens, step.logits_rows
        total = 0
        for tokens, start, blocks, wants_logits in seqs:
            n = len(tokens)
            end = start + n
            if n == 1:  # a decode: no range, no temporaries
                ids.append(tokens[0])
                positions.append(start)
            else:
                ids.extend(tokens)
                positions.extend(range(start, end))
            slots.extend(slot_mapping(blocks, start, end, block_size))
            total += n
            starts.append(total)
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(blocks)
            if wants_logits:
                rows.append(total - 1)
        return step

    @classmethod
    def decodes(cls, block_size: int, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
                block_copies: list[tuple[int, int]] | None = None) -> StepInput:
        """What `build` gives for sequences of one new token each (token_ids[i] at positions[i]),
        every one sampled: the decode-only step, built a column at a time (comprehensions, not
        a loop of appends per row)."""
        n = len(token_ids)
        return cls(
            block_size, token_ids=token_ids, positions=positions,
            # slot_mapping(blocks, p, p + 1, block_size) of each row, inlined
            slot_mapping=[blocks[p // block_size] * block_size + p % block_size for blocks, p in zip(block_tables, positions)],
            query_start_loc=list(range(n + 1)), query_lens=[1] * n, seq_lens=[p + 1 for p in positions],
            block_tables=block_tables, logits_rows=list(range(n)), block_copies=block_copies or [],
        )  # fmt: skip

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def max_blocks(self) -> int:
        """Width of the block table (at least 1)."""
        return max((len(t) for t in self.block_tables), default=1) or 1

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, every one sampled: the shape a decode CUDA graph runs."""
        return self.num_tokens == self.num_seqs == len(self.logits_rows)


# Stale rows past which BlockTableRows.write looks for them among the rows it holds: a decode
# step has a few (new blocks), a step after admissions or finishes most of them, moved.
MOVED_ROWS_MIN = 16


class BlockTableRows:
    """Steps' block tables, one after another, in one host int64 array [rows, width]: row i of
    step N is sequence i's block ids, 0 past them (what `padded_block_tables` builds).

    Only the rows whose block list changed since the previous write are converted: turning a
    decode step's 128 lists of ~140 Python ints into int64 costs ~0.4 ms on the host (on the
    critical path, between two GPU steps), while between two decode steps a row's list changes
    once in block_size steps (a new block) or when the row holds another sequence. A row is
    compared with a tuple copy of the list it was written from (C-level copy and compare).
    Tuples, not list copies: a tuple of ints leaves the garbage collector's lists, while ~10 list
    copies surviving per step brought a full collection (~150 ms over a burst's prompts, in the
    step loop) into a 512-request burst that had none."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array  # may be a view into a larger buffer (the decode graphs' pinned one)
        self._written: list[tuple[int, ...] | None] = [None] * array.shape[0]
        self.version = 0  # +1 per row rewritten: at equal versions, the array holds the same rows

    def write(self, block_tables: Sequence[list[int]]) -> np.ndarray:
        """Bring rows 0..len(block_tables)-1 up to `block_tables`; returns them (a view)."""
        array, written = self.array, self._written
        keys = [tuple(blocks) for blocks in block_tables]
        stale = [i for i, key in enumerate(keys) if written[i] != key]
        self.version += len(stale)
        rest = []
        for i in stale:  # most often a row that gained a block (a decode crossing into a new one)
            key, old = keys[i], written[i]
            if old is not None and len(key) == len(old) + 1 and key[:-1] == old:
                array[i, len(old)] = key[-1]
                written[i] = key
            else:
                rest.append(i)
        if len(rest) > MOVED_ROWS_MIN:
            rest = self._move_rows(keys, rest)
        for i in rest:
            key = keys[i]
            n = len(key)
            array[i, :n] = key
            array[i, n:] = 0
            written[i] = key
        return array[: len(keys)]

    def _move_rows(self, keys: list[tuple[int, ...]], stale: list[int]) -> list[int]:
        """Copy the stale rows that the array already holds in another row (the rows after a
        finished request move up; a step after admissions reorders them) from there, one numpy
        gather; returns the rows still to convert. A row is found by its last block and length
        (a request's newest block is its own), then compared whole."""
        written = self._written
        where = {(key[-1], len(key)): j for j, key in enumerate(written) if key}
        moved_to, moved_from, rest = [], [], []
        for i in stale:
            key = keys[i]
            j = where.get((key[-1], len(key))) if key else None
            if j is not None and written[j] == key:
                moved_to.append(i)
                moved_from.append(j)
            else:
                rest.append(i)
        if moved_to:
            self.array[moved_to] = self.array[moved_from]  # the sources are read before any is overwritten
            for i in moved_to:
                written[i] = keys[i]
        return rest

    def fits(self, num_rows: int, num_blocks: int) -> bool:
        return num_rows <= self.array.shape[0] and num_blocks <= self.array.shape[1]

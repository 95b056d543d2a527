"""StepInput: one step's host metadata, built once, read by every consumer of the step.

The scheduler builds it from the requests it picked and their KV handles; the runner turns it
into device tensors (CPU and GPU alike), the CUDA graphs copy it into their static buffers, and
the attention backends plan launches from its lengths. No Request, no scheduler types: plain
lists of ints. `slot_mapping` is the one place a token position becomes a KV slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def slot_mapping(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """KV slots (block_id * block_size + offset) of positions start..end-1 of a sequence whose
    block table is `block_ids`."""
    if end - start == 1:  # a decode's one token (the common case): no comprehension
        return [block_ids[start // block_size] * block_size + start % block_size]
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


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

    def add(self, token_ids: Sequence[int], start: int, block_ids: list[int], wants_logits: bool) -> None:
        """Append a sequence: its new tokens `token_ids` at positions start.., its block table, and
        whether its last new token's logits are wanted."""
        n = len(token_ids)
        end = start + n
        if n == 1:  # a decode (the common case, up to hundreds a step): no ranges, no temporaries
            self.token_ids.append(token_ids[0])
            self.positions.append(start)
        else:
            self.token_ids.extend(token_ids)
            self.positions.extend(range(start, end))
        self.slot_mapping.extend(slot_mapping(block_ids, start, end, self.block_size))
        rows = self.query_start_loc[-1] + n
        self.query_start_loc.append(rows)
        self.query_lens.append(n)
        self.seq_lens.append(end)
        self.block_tables.append(block_ids)
        if wants_logits:
            self.logits_rows.append(rows - 1)

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

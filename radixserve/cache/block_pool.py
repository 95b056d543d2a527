"""BlockPool: the physical KV blocks as integer ids, with a free list and reference counts.

The pool knows nothing about tokens, requests or the radix tree: an owner (a running request,
or the tree) holds one reference per block it uses, and a block returns to the free list when
its last reference is dropped. Everything above builds on two facts this class guarantees:
a block is free iff its ref count is 0, and a free block is never handed out twice.
"""

from __future__ import annotations

from radixserve.errors import NoFreeBlocksError


class BlockPool:
    """Ref-counted block ids ``0..num_blocks-1``.

    The free list is a stack: the most recently freed block is reused first, which keeps the
    working set of KV memory small and warm. Misuse (freeing a free block, sharing a free block,
    an id out of range) is a bookkeeping bug in the caller, so it raises ``RuntimeError`` or
    ``IndexError`` immediately rather than corrupting the pool silently.
    """

    __slots__ = ("num_blocks", "_ref_counts", "_free")

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks: int = num_blocks
        self._ref_counts: list[int] = [0] * num_blocks
        # Reversed so that a fresh pool hands out 0, 1, 2, ... (easier to read in tests and logs).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    def num_free(self) -> int:
        """Number of blocks on the free list (ref count 0)."""
        return len(self._free)

    def num_used(self) -> int:
        """Number of blocks with at least one owner."""
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; each comes back with ref count 1 (owned by the caller).

        Raises NoFreeBlocksError, taking nothing, if fewer than ``n`` blocks are free: the caller
        then evicts from the prefix cache or preempts a request and tries again.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        free = self._free
        if n > len(free):
            raise NoFreeBlocksError(f"requested {n} blocks, only {len(free)} of {self.num_blocks} free")
        if n == 0:
            return []
        blocks = free[-n:]
        del free[-n:]
        blocks.reverse()  # pop order: the top of the stack first
        ref_counts = self._ref_counts
        for block_id in blocks:
            ref_counts[block_id] = 1
        return blocks

    def incref(self, block_id: int) -> None:
        """Add an owner to an allocated block (the tree adopting it, a second request sharing it)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise RuntimeError(f"incref of free block {block_id}: allocate it first")
        self._ref_counts[block_id] += 1

    def incref_all(self, block_ids: list[int]) -> None:
        """incref of every id (a request taking a matched prefix of hundreds of blocks, in one
        call: this runs before the request's first GPU step, so it is on the TTFT path). A bad
        id raises as incref would; the ids before it stay counted (it is a bug either way)."""
        ref_counts, n = self._ref_counts, self.num_blocks
        for block_id in block_ids:
            if not 0 <= block_id < n or ref_counts[block_id] == 0:
                self.incref(block_id)  # raises the precise error
            ref_counts[block_id] += 1

    def decref_all(self, block_ids: list[int]) -> None:
        """decref of every id, in one call (a finished request letting go of its blocks)."""
        ref_counts, n, free = self._ref_counts, self.num_blocks, self._free
        for block_id in block_ids:
            if not 0 <= block_id < n or ref_counts[block_id] == 0:
                self.decref(block_id)  # raises the precise error
            count = ref_counts[block_id]
            ref_counts[block_id] = count - 1
            if count == 1:
                free.append(block_id)

    def decref(self, block_id: int) -> None:
        """Drop one owner; the block goes back to the free list when the count reaches 0."""
        self._check_id(block_id)
        count = self._ref_counts[block_id]
        if count == 0:
            raise RuntimeError(f"decref of free block {block_id} (double free)")
        self._ref_counts[block_id] = count - 1
        if count == 1:
            self._free.append(block_id)

    def ref_count(self, block_id: int) -> int:
        """Current number of owners of ``block_id`` (0 means free)."""
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def is_free(self, block_id: int) -> bool:
        """True iff ``block_id`` is on the free list."""
        return self.ref_count(block_id) == 0

    def _check_id(self, block_id: int) -> None:
        # A negative id would silently index from the end of the list; reject it explicitly.
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block id {block_id} out of range [0, {self.num_blocks})")

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, free={len(self._free)})"

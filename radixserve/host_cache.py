"""HostKVCache: the host-RAM tier of a GPU engine (`--host-cache-gb`).

Blocks evicted from the device pool are copied into one pinned host tensor of slots,
``[num_slots, num_layers, 2, block_size, kv_heads, head_dim]``, indexed by content key with LRU
order, and copied back into fresh pool blocks on a hit. On a CPU engine the pool already is host
RAM, so the engine does not build this tier there (it logs why); the class still runs on CPU
(unpinned, synchronous) so its bookkeeping and bytes are tested without a GPU.

Copies are batched, on their own CUDA stream:
- save: one gather of all the blocks on the device (``index_select`` over the pool's block dim,
  into slot order), then one device->host DMA per run of consecutive host slots (a batch gets
  consecutive slots when free ones are: they are handed out lowest first). The main stream
  waits only for the gather, so the forward that overwrites the evicted blocks is ordered after
  it, while the DMA runs alongside the forward.
- load: one host->device DMA per run of consecutive slots into a device staging tensor, then one
  ``index_copy_`` into the pool's blocks; the main stream waits for it before the forward.
Never one copy per block per layer: a block's layers are contiguous in a slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from radixserve.cache.block_keys import BlockKey
from radixserve.model.attention import KVCache

log = logging.getLogger("radixserve.tiers")


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position in `slots`, first slot, length) of each run of consecutive slot numbers."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot and runs[-1][0] + runs[-1][2] == i:
            pos, first, n = runs[-1]
            runs[-1] = (pos, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


class HostKVCache:
    """A fixed number of host slots, one block each, LRU by key (see the module doc)."""

    def __init__(self, kv_cache: KVCache, capacity_bytes: int) -> None:
        storage = kv_cache.storage
        if storage is None:
            raise ValueError("the host tier needs a KVCache allocated as one storage tensor")
        self.storage = storage  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
        num_layers, _, _, block_size, kv_heads, head_dim = storage.shape
        self.block_shape = (num_layers, 2, block_size, kv_heads, head_dim)
        self.block_bytes = storage[:, :, 0].numel() * storage.element_size()
        self.num_slots = capacity_bytes // self.block_bytes
        if self.num_slots < 1:
            raise ValueError(f"--host-cache-gb holds no block ({capacity_bytes} bytes < one block of {self.block_bytes})")
        self.device = storage.device
        on_cuda = self.device.type == "cuda"
        self.buffer = torch.empty((self.num_slots, *self.block_shape), dtype=storage.dtype, pin_memory=on_cuda)
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._slots: OrderedDict[BlockKey, int] = OrderedDict()  # key -> slot, least recent first
        self._free = list(range(self.num_slots - 1, -1, -1))  # popped from the end: lowest first
        self.hits = self.saves = self.evictions = 0
        self.bytes_loaded = self.bytes_saved = 0
        self._pending_timing: tuple[torch.cuda.Event, torch.cuda.Event, int] | None = None
        self.on_bandwidth: Callable[[int, float], None] | None = None  # (bytes, seconds) of a finished load

    def measure_bandwidth(self, nbytes: int = 256 << 20) -> float:
        """Host->device bytes/s of a copy from the pinned buffer (best of 3), the cost model's
        first estimate for this tier; 0 on CPU."""
        if self.stream is None:
            return 0.0
        flat = self.buffer.view(-1).view(torch.uint8)
        n = min(nbytes, flat.numel())
        target = torch.empty(n, dtype=torch.uint8, device=self.device)
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(flat[:n], non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        return n / best

    # ---- the index ----------------------------------------------------------------------
    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [key in self._slots for key in keys]

    @property
    def num_records(self) -> int:
        return len(self._slots)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return len(self._slots) * self.block_bytes

    def _take_slots(self, n: int, protected: set[BlockKey]) -> tuple[list[int], list[BlockKey], list[int]]:
        """n slots for new blocks: free ones first, then the least recently used (not
        `protected`). Returns (slots, evicted keys, their slots)."""
        evicted_keys: list[BlockKey] = []
        evicted_slots: list[int] = []
        while len(self._free) < n:
            victim = next((k for k in self._slots if k not in protected), None)
            if victim is None:
                break
            slot = self._slots.pop(victim)
            evicted_keys.append(victim)
            evicted_slots.append(slot)
            self._free.append(slot)
        self._free.sort(reverse=True)  # lowest first: a batch gets consecutive slots
        take = min(n, len(self._free))
        slots = [self._free.pop() for _ in range(take)]
        self.evictions += len(evicted_keys)
        return slots, evicted_keys, evicted_slots

    # ---- copies -------------------------------------------------------------------------
    def save(
        self,
        block_ids: Sequence[int],
        keys: Sequence[BlockKey],
        protected: set[BlockKey] = frozenset(),
        spill: Callable[[list[BlockKey], torch.Tensor], None] | None = None,
    ) -> int:
        """Copy pool blocks into host slots under their keys (keys already held are skipped).
        Slots are freed LRU first, never those of `protected` keys (this step's loads);
        `spill(keys, host_blocks)` gets the evicted blocks first (to write them to storage).
        Returns blocks saved."""
        todo = [(b, k) for b, k in zip(block_ids, keys) if k not in self._slots]
        if not todo:
            return 0
        slots, evicted_keys, evicted_slots = self._take_slots(len(todo), set(protected))
        if evicted_keys and spill is not None:
            self._sync()  # earlier saves into those slots must have landed
            spill(evicted_keys, self.buffer[torch.tensor(evicted_slots)])
        todo = todo[: len(slots)]
        if not todo:
            return 0
        index = torch.tensor([b for b, _ in todo], dtype=torch.long).to(self.device, non_blocking=True)
        with self._on_copy_stream():
            # [L, 2, n, ...] -> [n, L, 2, ...]: one gather, slot-major like the host buffer
            if self.stream is not None:
                index.record_stream(self.stream)  # made on the main stream, read on this one
            gathered = self.storage.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous()
        if self.stream is not None:
            # the forward may overwrite the evicted blocks once the gather is done
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        with self._on_copy_stream():
            for pos, first, n in slot_runs(slots):
                self.buffer[first : first + n].copy_(gathered[pos : pos + n], non_blocking=True)
        for (_, key), slot in zip(todo, slots):
            self._slots[key] = slot
        self.saves += len(todo)
        self.bytes_saved += len(todo) * self.block_bytes
        return len(todo)

    def load(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> int:
        """Copy the host blocks of `keys` into pool blocks `block_ids` (every key must be held:
        the manager checked `contains` this step, and this step's saves protect them)."""
        if not keys:
            return 0
        self._observe_finished_load()
        slots = [self._slots[k] for k in keys]
        for k in keys:
            self._slots.move_to_end(k)
        n_blocks = len(slots)
        index = torch.tensor(list(block_ids), dtype=torch.long).to(self.device, non_blocking=True)
        timing = None
        with self._on_copy_stream():
            if self.stream is not None:
                timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                timing[0].record(self.stream)
            if self.stream is not None:
                index.record_stream(self.stream)
            staging = torch.empty((n_blocks, *self.block_shape), dtype=self.storage.dtype, device=self.device)
            for pos, first, n in slot_runs(slots):
                staging[pos : pos + n].copy_(self.buffer[first : first + n], non_blocking=True)
            self.storage.index_copy_(2, index, staging.permute(1, 2, 0, 3, 4, 5))
            if timing is not None:
                timing[1].record(self.stream)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._pending_timing = (*timing, n_blocks * self.block_bytes)
        self.hits += n_blocks
        self.bytes_loaded += n_blocks * self.block_bytes
        return n_blocks

    def _observe_finished_load(self) -> None:
        """Report the previous load's measured bandwidth once its copies finished (no sync)."""
        pending = self._pending_timing
        if pending is None or not pending[1].query():
            return
        self._pending_timing = None
        if self.on_bandwidth is not None:
            self.on_bandwidth(pending[2], pending[0].elapsed_time(pending[1]) / 1000)

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _on_copy_stream(self):
        if self.stream is None:
            return _NoStream()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the blocks are written
        return torch.cuda.stream(self.stream)


class _NoStream:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

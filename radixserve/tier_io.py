"""TierIO: runs a step's block copies between the device pool and the lower tiers.

The cache manager lists what moves (cache/tiers.py `TierTransfers`); this is the tensor side
that moves it, beside the runner that owns the pool. The engine calls `run` after scheduling
and before the forward pass, in this order:

1. write-back: blocks the tree evicted go one tier down: into host RAM when there is a host
   tier (whose own LRU victims go on to storage), else to storage.
2. write-through: blocks of newly pinned prefixes go to storage.
   Both copy the blocks out now (the blocks may have been reallocated and are overwritten by
   this step's loads or forward); storage writes then happen on the StoreWriter's thread.
3. loads: host blocks (batched DMA, their own stream), then verified storage records, into the
   fresh pool blocks the manager allocated.

A block already held below (or already queued for writing) is not copied again.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from radixserve.cache.block_keys import BlockKey
from radixserve.cache.kv_store import KVLayout, KVRecord, KVStore
from radixserve.cache.store_writer import StoreWriter
from radixserve.cache.tiers import LoadCostModel, TierTransfers
from radixserve.host_cache import HostKVCache
from radixserve.kv_transfer import block_layout, blocks_to_records, records_to_blocks
from radixserve.model.attention import KVCache

log = logging.getLogger("radixserve.tiers")


class TierIO:
    def __init__(
        self,
        kv_cache: KVCache,
        identity: str,
        store: KVStore | None,
        host: HostKVCache | None,
        cost_model: LoadCostModel,
        load_seconds: deque[tuple[str, float]] | None = None,
        max_pending_bytes: int = 1 << 30,
    ) -> None:
        self.kv_cache = kv_cache
        self.identity = identity
        self.store = store
        self.host = host
        self.cost_model = cost_model
        self.layout: KVLayout = block_layout(kv_cache)
        self.writer = StoreWriter(store, max_pending_bytes) if store is not None else None
        self.load_seconds = load_seconds if load_seconds is not None else deque(maxlen=4096)
        if host is not None:
            host.on_bandwidth = self._observe_host_load
            measured = host.measure_bandwidth()
            if measured:
                cost_model.read_bytes_per_s["host"] = measured
                log.info("host-RAM tier: host->device %.1f GB/s measured", measured / 1e9)

    def _observe_host_load(self, nbytes: int, seconds: float) -> None:
        self.cost_model.observe_read("host", nbytes, seconds)
        self.load_seconds.append(("host", seconds))

    def run(self, transfers: TierTransfers) -> None:
        protected = {k for _, k in transfers.host_loads}
        if transfers.write_back:
            blocks, keys = zip(*transfers.write_back)
            if self.host is not None:
                self.host.save(blocks, keys, protected, spill=self._spill_to_store if self.store else None)
            else:
                self._write_to_store(list(blocks), list(keys))
        if transfers.write_through:
            blocks, keys = zip(*transfers.write_through)
            self._write_to_store(list(blocks), list(keys))
        if transfers.host_loads:
            blocks, keys = zip(*transfers.host_loads)
            self.host.load(blocks, keys)
        if transfers.store_loads:  # read and verified before admission: a copy into the pool is left
            blocks, records = zip(*transfers.store_loads)
            records_to_blocks(self.kv_cache, blocks, records)

    def _write_to_store(self, blocks: list[int], keys: list[BlockKey]) -> None:
        """Copy the blocks the store does not hold yet out of the pool; the writer puts them."""
        if self.writer is None:
            return
        held = self.store.contains(keys)
        todo = [(b, k) for b, k, h in zip(blocks, keys, held) if not h and not self.writer.is_pending(k)]
        if todo:
            self.writer.submit(blocks_to_records(self.kv_cache, [b for b, _ in todo], [k for _, k in todo], self.identity))

    def _spill_to_store(self, keys: list[BlockKey], host_blocks: torch.Tensor) -> None:
        """Host RAM's LRU victims go on down to storage (device -> host -> storage)."""
        held = self.store.contains(keys)
        records = []
        for key, block, h in zip(keys, host_blocks, held):
            if h or self.writer.is_pending(key):
                continue
            payload = bytearray(self.layout.nbytes)
            torch.frombuffer(payload, dtype=torch.uint8).view(block.dtype).view(block.shape).copy_(block)
            records.append(KVRecord(key=key, identity=self.identity, layout=self.layout, payload=payload))
        self.writer.submit(records)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every block listed for storage so far is written (tests, shutdown)."""
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.store is not None:
            self.store.close()

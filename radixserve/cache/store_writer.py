"""StoreWriter: puts records into a KVStore on its own thread, so the engine never waits on disk.

Writing a block through to storage costs milliseconds (a 0.7-2 MiB file, an fsync), far more
than an engine step can spare, and nothing waits for it: a block written late is only found
late. So the engine thread copies the blocks out of the pool (kv_transfer.blocks_to_records, the
part that must happen before the blocks are released) and hands the records here; one writer
thread puts them in batches.

Memory is bounded: records waiting to be written count against ``max_pending_bytes``, and a
submit past it drops the records that do not fit (counted; the blocks are simply not stored, a
later write-through or eviction can store them again). A key already waiting is not queued twice.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from radixserve.cache.block_keys import BlockKey
from radixserve.cache.kv_store import KVRecord, KVStore

log = logging.getLogger("radixserve.kv_store")


@dataclass(slots=True)
class StoreWriterStats:
    submitted: int = 0  # records accepted for writing
    dropped: int = 0  # records refused: the pending budget was full, or the writer closed
    written: int = 0  # records the store holds after their put
    failed: int = 0  # records whose put did not store them (the store logged why)


class StoreWriter:
    """A background thread that drains submitted records into ``store`` (see the module doc)."""

    def __init__(self, store: KVStore, max_pending_bytes: int, max_batch: int = 64) -> None:
        if max_pending_bytes <= 0 or max_batch <= 0:
            raise ValueError("max_pending_bytes and max_batch must be positive")
        self.store = store
        self.max_pending_bytes = max_pending_bytes
        self.max_batch = max_batch
        self.stats = StoreWriterStats()
        self._queue: deque[KVRecord] = deque()
        self._pending_keys: set[BlockKey] = set()
        self._pending_bytes = 0
        self._in_flight = 0  # records taken by the thread and not yet put
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv-store-writer", daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[KVRecord]) -> int:
        """Queue records for writing; returns how many were accepted (the rest are dropped)."""
        accepted = dropped = 0
        with self._cond:
            for record in records:
                if record.key in self._pending_keys:
                    continue  # already on its way
                size = len(record.payload)
                if self._closed or self._pending_bytes + size > self.max_pending_bytes:
                    dropped += 1
                    continue
                self._queue.append(record)
                self._pending_keys.add(record.key)
                self._pending_bytes += size
                accepted += 1
            self.stats.submitted += accepted
            self.stats.dropped += dropped
            if accepted:
                self._cond.notify_all()
        if dropped:
            log.warning(
                "KV store writer: %d records dropped (pending budget of %d bytes full)", dropped, self.max_pending_bytes
            )
        return accepted

    def is_pending(self, key: BlockKey) -> bool:
        """True while ``key`` is queued or being written (not in the store yet)."""
        with self._cond:
            return key in self._pending_keys

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written; False if ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the thread. Later submits are dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._in_flight = len(batch)
            stored = self.store.put(batch)  # never raises: I/O trouble is logged and counted there
            with self._cond:
                for record in batch:
                    self._pending_keys.discard(record.key)
                    self._pending_bytes -= len(record.payload)
                self._in_flight = 0
                self.stats.written += stored
                self.stats.failed += len(batch) - stored
                self._cond.notify_all()

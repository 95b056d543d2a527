"""StorePrefetcher: reads a waiting request's storage-tier records on a background thread.

Read at admission, a storage hit would stall the whole batch: the engine thread would wait for
the disk (or Redis) while every running request waits with it. Instead the scheduler asks
`KVCacheManager.loading(request)` before it admits a request; the first time, the manager
lists the blocks the store holds past the device (and host) match and this class starts reading
them. The request stays waiting (its *loading* state) while the rest of the batch runs; once
the read is done, admission takes the verified records from here, a dict lookup, and the step
copies them into pool blocks as before (tier_io.py).

Records wait here only until their request is admitted or dropped; past `max_bytes` the oldest
go (admission then reads those again itself: slower, never wrong, since admission verifies
nothing less than the store's `get` did).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from radixserve.cache.block_keys import BlockKey
from radixserve.cache.kv_store import KVRecord, KVStore

log = logging.getLogger("radixserve.tiers")


@dataclass(slots=True)
class PrefetchResult:
    records: list[KVRecord | None]  # in key order; None: missing or corrupt (logged by the store)
    keys: list[BlockKey]
    seconds: float  # the read's wall time (the cost model's storage bandwidth sample)


class StorePrefetcher:
    def __init__(self, store: KVStore, max_bytes: int = 1 << 30) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-store-prefetch")
        self._reads: dict[str, Future[PrefetchResult]] = {}  # request id -> its read
        self._records: OrderedDict[BlockKey, KVRecord] = OrderedDict()  # read, not taken yet
        self._bytes = 0
        self._samples: list[tuple[int, float]] = []
        # reads submitted and not ended, and reads ended since the last `wait` (which blocks on this)
        self._progress = threading.Condition()
        self._num_running = self._num_ended = 0

    def start(self, request_id: str, keys: Sequence[BlockKey]) -> None:
        with self._progress:
            self._num_running += 1
        self._reads[request_id] = self._executor.submit(self._read, list(keys))

    def is_reading(self, request_id: str) -> bool:
        """True while the request's read runs. When it has ended, its records are kept for
        `take` and its (bytes, seconds) sample for `take_samples`."""
        read = self._reads.get(request_id)
        if read is None:
            return False
        if not read.done():
            return True
        del self._reads[request_id]
        try:
            result = read.result()
        except Exception:  # noqa: BLE001 - a failed read is a miss: admission reads again or recomputes
            log.warning("prefetching KV records failed; admission reads them", exc_info=True)
            return False
        read_bytes = 0
        for key, record in zip(result.keys, result.records):
            if record is not None:
                read_bytes += len(record.payload)
                self._keep(key, record)
        self._samples.append((read_bytes, result.seconds))
        return False

    def take_samples(self) -> list[tuple[int, float]]:
        """(bytes, seconds) of each read finished since the last call (storage bandwidth)."""
        samples, self._samples = self._samples, []
        return samples

    def take(self, keys: Sequence[BlockKey]) -> list[KVRecord | None]:
        """The prefetched records of these keys (None where none is held); they leave this cache."""
        out = []
        for key in keys:
            record = self._records.pop(key, None)
            if record is not None:
                self._bytes -= len(record.payload)
            out.append(record)
        return out

    def forget(self, request_id: str) -> None:
        """The request left (admitted, aborted): a read not started yet is not needed."""
        read = self._reads.pop(request_id, None)
        if read is not None and read.cancel():  # it never runs, so it never ends
            with self._progress:
                self._num_running -= 1

    def wait(self, timeout: float) -> bool:
        """Block (without the GIL) until a read ends or `timeout` passes: a step with nothing
        to run but loading requests waits here rather than spinning against the reader thread.
        True at once if a read ended since the last call (the next step admits its request);
        False at once if none did and none is running: there is nothing to wait for."""
        with self._progress:
            if not self._num_ended:
                if not self._num_running:
                    return False
                self._progress.wait(timeout)
            self._num_ended = 0
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _keep(self, key: BlockKey, record: KVRecord) -> None:
        if key in self._records:
            return
        self._records[key] = record
        self._bytes += len(record.payload)
        while self._bytes > self.max_bytes and self._records:
            _, dropped = self._records.popitem(last=False)
            self._bytes -= len(dropped.payload)

    def _read(self, keys: list[BlockKey]) -> PrefetchResult:
        try:
            start = time.perf_counter()
            records = self.store.get(keys)
            return PrefetchResult(records, keys, time.perf_counter() - start)
        finally:
            with self._progress:
                self._num_running -= 1
                self._num_ended += 1
                self._progress.notify_all()

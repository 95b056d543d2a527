"""StoreWriter: records land in the store off the caller's thread, within a memory budget."""

from __future__ import annotations

import threading

import pytest

from radixserve.cache.kv_store import MemoryKVStore
from radixserve.cache.store_writer import StoreWriter
from tests.cache.store_helpers import IDENTITY, KEYS, make_record

PAYLOAD = len(make_record(0).payload)


class GatedStore(MemoryKVStore):
    """A memory store whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(IDENTITY, capacity_bytes=10**6)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.writer_threads: set[str] = set()

    def _write(self, items):
        self.writer_threads.add(threading.current_thread().name)
        self.entered.set()
        self.gate.wait()
        return super()._write(items)


def test_records_are_written_on_the_writer_thread() -> None:
    store = GatedStore()
    store.gate.set()
    writer = StoreWriter(store, max_pending_bytes=100 * PAYLOAD, max_batch=3)
    assert writer.submit([make_record(i) for i in range(7)]) == 7
    assert writer.flush(timeout=30)
    assert store.contains(KEYS[:8]) == [True] * 7 + [False]
    assert store.writer_threads == {"kv-store-writer"}
    assert (writer.stats.submitted, writer.stats.written, writer.stats.failed) == (7, 7, 0)
    assert writer.pending_bytes == 0
    writer.close(timeout=30)


def test_budget_bounds_pending_records_and_keys_queue_once() -> None:
    store = GatedStore()
    writer = StoreWriter(store, max_pending_bytes=3 * PAYLOAD, max_batch=1)
    assert writer.submit([make_record(0)]) == 1
    assert store.entered.wait(timeout=30)  # record 0 is in flight, still counted as pending
    assert writer.is_pending(KEYS[0])
    assert writer.submit([make_record(0), make_record(1), make_record(2), make_record(3)]) == 2
    assert (writer.stats.dropped, writer.pending_bytes) == (1, 3 * PAYLOAD)
    store.gate.set()
    assert writer.flush(timeout=30)
    assert store.contains(KEYS[:4]) == [True, True, True, False]
    assert not writer.is_pending(KEYS[0]) and writer.pending_bytes == 0
    assert writer.submit([make_record(3)]) == 1  # room again
    writer.close(timeout=30)
    assert store.contains([KEYS[3]]) == [True]  # close drains the queue


def test_failed_puts_are_counted_and_the_thread_lives_on() -> None:
    store = MemoryKVStore(IDENTITY, capacity_bytes=PAYLOAD)  # smaller than one whole record
    writer = StoreWriter(store, max_pending_bytes=10 * PAYLOAD)
    writer.submit([make_record(0)])
    assert writer.flush(timeout=30)
    assert (writer.stats.written, writer.stats.failed) == (0, 1)
    big = MemoryKVStore(IDENTITY, capacity_bytes=10**6)
    writer.store = big
    writer.submit([make_record(1)])
    assert writer.flush(timeout=30) and big.contains([KEYS[1]]) == [True]
    writer.close(timeout=30)


def test_submit_after_close_is_dropped() -> None:
    writer = StoreWriter(MemoryKVStore(IDENTITY, capacity_bytes=10**6), max_pending_bytes=10 * PAYLOAD)
    writer.close(timeout=30)
    assert writer.submit([make_record(0)]) == 0 and writer.stats.dropped == 1
    with pytest.raises(ValueError):
        StoreWriter(writer.store, max_pending_bytes=0)

"""StorePrefetcher.wait: what a step with nothing to run but loading requests blocks on. It
says whether it waited for a read (the caller steps again at once) or had nothing to wait for
(the caller naps: a stalled engine must not spin)."""

from __future__ import annotations

from radixserve.cache.kv_store import MemoryKVStore
from radixserve.cache.prefetch import StorePrefetcher
from tests.cache.store_helpers import IDENTITY, KEYS, make_record


def test_wait_reports_a_read_that_ended_once_then_nothing_to_wait_for():
    store = MemoryKVStore(IDENTITY, 1 << 20)
    store.put([make_record(i) for i in range(3)])
    prefetcher = StorePrefetcher(store)
    try:
        assert not prefetcher.wait(0.0)  # no read at all
        prefetcher.start("r", KEYS[:3])
        assert prefetcher.wait(10.0)  # blocked until the read ended, or it had ended already
        # the ended read is not collected yet (is_reading does that): nothing to wait for, so
        # a scheduler that never gets to collect it sees a stall rather than spinning
        assert not prefetcher.wait(10.0)
        assert not prefetcher.is_reading("r")
        assert [r.key for r in prefetcher.take(KEYS[:3])] == KEYS[:3]
    finally:
        prefetcher.close()

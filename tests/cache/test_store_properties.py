"""Stateful property test of the KV stores against an exact model, restarts and faults included.

A hypothesis state machine puts, gets and deletes batches of blocks from two namespaces whose
token blocks are identical (so only the key keeps them apart), corrupts stored records, and, for
the disk backend, restarts the process's view (close + reopen) and deletes the whole directory;
for the Redis backend (a real redis-server, no maxmemory: Redis's own eviction is not modelled),
reopens the store and flushes the server behind its back.
Next to the store it keeps a model: which blocks are held, in LRU order, and which are corrupt.
Checked after every step: a get returns exactly the record of the key asked for or nothing,
capacity and byte accounting hold, and the disk holds exactly the modelled records.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import unittest
from collections import OrderedDict
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.cache.block_keys import prefix_keys
from radixserve.cache.disk_store import RECORD_SUFFIX, DiskKVStore
from radixserve.cache.kv_store import KVRecord, KVStore, MemoryKVStore, encode_record
from tests.cache.store_helpers import CACHE_IDENTITY, IDENTITY, LAYOUT
from tests.redis_server import RedisServer, find_redis_server

NAMESPACES = ("a", "b")
BLOCKS_PER_NAMESPACE = 6
TOKENS = list(range(2 * BLOCKS_PER_NAMESPACE))  # the same tokens in both namespaces
KEYS = [k for ns in NAMESPACES for k in prefix_keys(CACHE_IDENTITY, ns, TOKENS)]
CAPACITY_RECORDS = 5


def record(i: int) -> KVRecord:
    payload = hashlib.sha256(b"block %d" % i).digest() * 2
    return KVRecord(key=KEYS[i], identity=IDENTITY, layout=LAYOUT, payload=payload)


RECORD_SIZE = len(encode_record(record(0)))
batches = st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=4, unique=True)


class StoreMachine(RuleBasedStateMachine):
    on_disk = False
    redis: RedisServer | None = None  # set for the Redis machine

    def __init__(self) -> None:
        super().__init__()
        self.bounded = self.redis is None  # the store keeps its capacity itself (Redis: maxmemory)
        self.client = self.redis.client() if self.redis is not None else None
        if self.client is not None:
            self.client.flushall()
        self.root = Path(tempfile.mkdtemp(prefix="kvstore-prop-")) if self.on_disk else None
        self.store: KVStore = self.open()
        self.model: OrderedDict[int, str] = OrderedDict()  # block -> "ok" | "corrupt", LRU first
        self.counted: dict[int, int] = {}  # bytes the store accounts for a held block
        self.file_size: dict[int, int] = {}  # bytes actually stored for it
        self.asked = 0

    def open(self) -> KVStore:
        if self.redis is not None:
            from radixserve.cache.redis_store import RedisKVStore

            return RedisKVStore(self.redis.url, IDENTITY, info_max_age_s=0)
        if self.on_disk:
            return DiskKVStore(self.root, CAPACITY_RECORDS * RECORD_SIZE, IDENTITY, fsync=False)
        return MemoryKVStore(IDENTITY, CAPACITY_RECORDS * RECORD_SIZE)

    def teardown(self) -> None:
        self.store.close()
        if self.client is not None:
            self.client.close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    @rule(blocks=batches)
    def put(self, blocks: list[int]) -> None:
        assert self.store.put([record(i) for i in blocks]) == len(blocks)
        for i in blocks:
            if i in self.model:
                self.model.move_to_end(i)  # held: touched, not rewritten (a corrupt one stays so)
                continue
            capacity = CAPACITY_RECORDS * RECORD_SIZE
            while self.bounded and sum(self.counted[j] for j in self.model) + RECORD_SIZE > capacity:
                self.model.popitem(last=False)
            self.model[i] = "ok"
            self.counted[i] = self.file_size[i] = RECORD_SIZE

    @rule(blocks=batches)
    def get(self, blocks: list[int]) -> None:
        got = self.store.get([KEYS[i] for i in blocks])
        self.asked += len(blocks)
        for i, rec in zip(blocks, got, strict=True):
            state = self.model.get(i)
            if state == "ok":
                assert rec == record(i)
                self.model.move_to_end(i)
            else:
                assert rec is None
                self.model.pop(i, None)  # a corrupt record is dropped once seen

    @rule(blocks=batches)
    def delete(self, blocks: list[int]) -> None:
        assert self.store.delete([KEYS[i] for i in blocks]) == sum(i in self.model for i in blocks)
        for i in blocks:
            self.model.pop(i, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), how=st.sampled_from(["flip", "truncate", "other-block"]))
    def corrupt(self, data: st.DataObject, how: str) -> None:
        i = data.draw(st.sampled_from(sorted(self.model)))
        raw = encode_record(record(i))
        if how == "flip":
            pos = data.draw(st.integers(0, len(raw) - 1))
            bad = raw[:pos] + bytes([raw[pos] ^ 0x10]) + raw[pos + 1 :]
        elif how == "truncate":
            bad = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            bad = encode_record(record((i + 1) % len(KEYS)))  # intact, but another block's
        if self.redis is not None:
            self.client.set(self.store.redis_key(KEYS[i]), bad)  # type: ignore[attr-defined]
        elif isinstance(self.store, DiskKVStore):
            self.store.path_of(KEYS[i]).write_bytes(bad)  # counted at its written size until a restart
        else:
            bad = bad[: self.counted[i]]  # tampering never grows it past what capacity allowed
            self.store._records[KEYS[i]] = bad  # type: ignore[attr-defined]
            self.store._used += len(bad) - self.counted[i]  # type: ignore[attr-defined]
            self.counted[i] = len(bad)
        self.file_size[i] = len(bad)
        self.model[i] = "corrupt"

    @precondition(lambda self: self.on_disk)
    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = self.open()
        # Recency survives as mtimes, whose ties (same clock tick) may reorder: adopt the
        # store's order, after checking it holds the same blocks. Sizes are now the files'.
        order = [KEYS.index(k) for k in self.store._index]  # type: ignore[attr-defined]
        assert sorted(order) == sorted(self.model)
        self.model = OrderedDict((i, self.model[i]) for i in order)
        for i in self.model:
            self.counted[i] = self.file_size[i]

    @precondition(lambda self: self.on_disk)
    @rule()
    def vanish(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # already gone if nothing recreated it
        assert self.store.get(KEYS) == [None] * len(KEYS)  # noticed on the first read: all misses
        self.asked += len(KEYS)
        self.model.clear()

    @precondition(lambda self: self.redis is not None)
    @rule()
    def reopen(self) -> None:  # another process (a restarted replica) sees the same records
        self.store.close()
        asked = self.store.stats.hits + self.store.stats.misses
        self.store = self.open()
        self.asked -= asked

    @precondition(lambda self: self.redis is not None)
    @rule()
    def flush_behind_its_back(self) -> None:  # an operator's FLUSHDB, or Redis evicting it all
        self.client.flushdb()
        assert self.store.get(KEYS) == [None] * len(KEYS)
        self.asked += len(KEYS)
        self.model.clear()

    @invariant()
    def accounting_holds(self) -> None:
        assert self.store.contains(KEYS) == [i in self.model for i in range(len(KEYS))]
        assert self.store.num_records == len(self.model)
        if self.redis is not None:  # server memory, not record bytes: only the keys are exact
            assert sorted(self.client.keys("*")) == sorted(
                self.store.redis_key(KEYS[i]).encode() for i in self.model  # type: ignore[attr-defined]
            )
            assert self.store.stats.hits + self.store.stats.misses == self.asked
            return
        assert self.store.used_bytes == sum(self.counted[i] for i in self.model) <= self.store.capacity_bytes
        if isinstance(self.store, DiskKVStore):
            on_disk = {p.name: p.stat().st_size for p in self.root.rglob("*") if p.is_file() and p.name != "lock"}
            assert on_disk == {KEYS[i].hex() + RECORD_SUFFIX: self.file_size[i] for i in self.model}
        if not self.on_disk:  # a disk restart starts fresh counters
            assert self.store.stats.hits + self.store.stats.misses == self.asked


class DiskStoreMachine(StoreMachine):
    on_disk = True


TestMemoryStoreProperties = StoreMachine.TestCase
TestMemoryStoreProperties.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestDiskStoreProperties = DiskStoreMachine.TestCase
TestDiskStoreProperties.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)


class RedisStoreMachine(StoreMachine):
    """One redis-server for all examples (started once, flushed per example)."""


class TestRedisStoreProperties(RedisStoreMachine.TestCase):  # type: ignore[name-defined]
    settings = settings(max_examples=25, stateful_step_count=20, deadline=None)  # ~3 s on an idle box

    @classmethod
    def setUpClass(cls) -> None:
        executable = find_redis_server()
        if executable is None:
            raise unittest.SkipTest("redis-server not found (scripts/setup-venv.sh installs it)")
        RedisStoreMachine.redis = RedisServer(executable)
        RedisStoreMachine.redis.start()

    @classmethod
    def tearDownClass(cls) -> None:
        if RedisStoreMachine.redis is not None:
            RedisStoreMachine.redis.close()
            RedisStoreMachine.redis = None

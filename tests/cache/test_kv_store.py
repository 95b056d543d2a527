"""The record format (framing, checksum, refusals) and the store interface's semantics, on the
in-memory reference backend."""

from __future__ import annotations

import hashlib
import json
import logging
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.cache.kv_store import (
    CHECKSUM_SIZE,
    RECORD_HEADER_SIZE,
    CorruptRecordError,
    KVLayout,
    KVRecord,
    KVStoreError,
    MemoryKVStore,
    NullKVStore,
    decode_record,
    encode_record,
    open_kv_store,
)
from tests.cache.store_helpers import IDENTITY, KEYS, LAYOUT, make_record


def reseal(data: bytes) -> bytes:
    """Recompute the trailer, so a test reaches the checks that run after the checksum."""
    body = data[:-CHECKSUM_SIZE]
    return body + hashlib.sha256(body).digest()


# ---- record format ---------------------------------------------------------------------------
def test_round_trip_and_layout_of_bytes() -> None:
    record = make_record(0)
    data = encode_record(record)
    assert data[:8] == b"RSKVREC\x00"
    assert struct.unpack_from("<H", data, 8)[0] == 1
    assert data[24:56] == record.key
    assert data[-CHECKSUM_SIZE:] == hashlib.sha256(data[:-CHECKSUM_SIZE]).digest()
    meta_len, payload_len = struct.unpack_from("<IQ", data, 12)
    assert payload_len == 64 and len(data) == RECORD_HEADER_SIZE + meta_len + payload_len + CHECKSUM_SIZE
    assert decode_record(data, record.key, IDENTITY) == record


@given(pos=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_flipped_byte_is_refused(pos: int, flip: int) -> None:
    data = bytearray(encode_record(make_record(1)))
    data[pos % len(data)] ^= flip
    with pytest.raises(CorruptRecordError):
        decode_record(bytes(data), KEYS[1], IDENTITY)


def test_every_truncation_and_any_extension_is_refused() -> None:
    data = encode_record(make_record(2))
    for length in range(len(data)):
        with pytest.raises(CorruptRecordError):
            decode_record(data[:length], KEYS[2], IDENTITY)
    with pytest.raises(CorruptRecordError, match="length"):
        decode_record(data + b"\x00", KEYS[2], IDENTITY)


def test_intact_record_of_another_block_or_identity_is_refused() -> None:
    data = encode_record(make_record(3))
    with pytest.raises(CorruptRecordError, match="asked for"):
        decode_record(data, KEYS[4], IDENTITY)
    other = encode_record(make_record(3, identity="other@def/float16;block_size=2;kv_layout=1"))
    with pytest.raises(CorruptRecordError, match="identity"):
        decode_record(other, KEYS[3], IDENTITY)


def test_checks_behind_the_checksum() -> None:
    data = encode_record(make_record(5))
    with pytest.raises(CorruptRecordError, match="magic"):
        decode_record(reseal(b"XXXXXXXX" + data[8:]), KEYS[5], IDENTITY)
    with pytest.raises(CorruptRecordError, match="version"):
        decode_record(reseal(data[:8] + struct.pack("<H", 2) + data[10:]), KEYS[5], IDENTITY)
    with pytest.raises(CorruptRecordError, match="flags"):
        decode_record(reseal(data[:10] + struct.pack("<H", 1) + data[12:]), KEYS[5], IDENTITY)
    # A meta block whose layout disagrees with the payload length (same meta length, resealed).
    meta_len = struct.unpack_from("<I", data, 12)[0]
    meta = data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + meta_len]
    bad_meta = meta.replace(b"[2,2,2,1,4]", b"[2,2,2,1,2]")
    assert len(bad_meta) == len(meta) and bad_meta != meta
    tampered = data[:RECORD_HEADER_SIZE] + bad_meta + data[RECORD_HEADER_SIZE + meta_len :]
    with pytest.raises(CorruptRecordError, match="layout"):
        decode_record(reseal(tampered), KEYS[5], IDENTITY)
    garbage_meta = b"{" * meta_len
    tampered = data[:RECORD_HEADER_SIZE] + garbage_meta + data[RECORD_HEADER_SIZE + meta_len :]
    with pytest.raises(CorruptRecordError, match="meta"):
        decode_record(reseal(tampered), KEYS[5], IDENTITY)
    json.loads(meta)  # the untampered meta is plain JSON


def test_record_and_layout_validation() -> None:
    with pytest.raises(ValueError, match="dtype"):
        KVLayout("float64x", (1,))
    with pytest.raises(ValueError, match="shape"):
        KVLayout("float32", (2, 0))
    with pytest.raises(ValueError, match="payload"):
        KVRecord(KEYS[0], IDENTITY, LAYOUT, b"\x00" * 63)
    with pytest.raises(ValueError, match="key"):
        KVRecord(b"\x00" * 31, IDENTITY, LAYOUT, b"\x00" * 64)  # type: ignore[arg-type]
    assert KVLayout("bfloat16", (3, 5)).nbytes == 30


# ---- store semantics (memory backend) --------------------------------------------------------
def test_batched_get_put_contains_delete_keep_order() -> None:
    store = MemoryKVStore(IDENTITY, capacity_bytes=10_000)
    assert store.put([make_record(i) for i in (0, 2, 4)]) == 3
    got = store.get([KEYS[i] for i in range(5)])
    assert [r is not None for r in got] == [True, False, True, False, True]
    assert got[2] == make_record(2)
    assert store.contains([KEYS[4], KEYS[3]]) == [True, False]
    assert store.delete([KEYS[0], KEYS[1]]) == 1
    assert store.contains([KEYS[0]]) == [False]
    assert (store.stats.hits, store.stats.misses, store.stats.puts) == (3, 2, 3)
    assert store.stats.bytes_read == 3 * len(encode_record(make_record(0)))
    assert store.get([]) == [] and store.put([]) == 0 and store.contains([]) == [] and store.delete([]) == 0


def test_putting_a_held_key_keeps_it_without_rewriting() -> None:
    store = MemoryKVStore(IDENTITY, capacity_bytes=10_000)
    store.put([make_record(0)])
    assert store.put([make_record(0)]) == 1
    assert store.stats.puts == 1 and store.num_records == 1


def test_put_under_another_identity_is_a_programming_error() -> None:
    store = MemoryKVStore(IDENTITY, capacity_bytes=10_000)
    with pytest.raises(ValueError, match="identity"):
        store.put([make_record(0, identity="x;block_size=2;kv_layout=1")])


def test_corrupt_record_is_a_logged_counted_dropped_miss(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryKVStore(IDENTITY, capacity_bytes=10_000)
    store.put([make_record(0), make_record(1)])
    raw = bytearray(store._records[KEYS[0]])
    raw[-40] ^= 0x01  # one payload bit
    store._records[KEYS[0]] = bytes(raw)
    store._records[KEYS[1]] = encode_record(make_record(2))  # an intact record under the wrong key
    with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
        assert store.get([KEYS[0], KEYS[1]]) == [None, None]
    assert "checksum mismatch" in caplog.text and "asked for" in caplog.text
    assert (store.stats.corrupt_records, store.stats.misses, store.stats.hits) == (2, 2, 0)
    assert store.contains([KEYS[0], KEYS[1]]) == [False, False]  # dropped: a put can replace them
    assert store.put([make_record(0)]) == 1
    assert store.get([KEYS[0]]) == [make_record(0)]


def test_memory_store_lru_capacity() -> None:
    size = len(encode_record(make_record(0)))
    store = MemoryKVStore(IDENTITY, capacity_bytes=3 * size)
    store.put([make_record(i) for i in range(3)])
    store.get([KEYS[0]])  # 0 is now the most recent; 1 the least
    store.put([make_record(3)])
    assert store.contains(KEYS[:4]) == [True, False, True, True]
    assert store.stats.evictions == 1 and store.used_bytes == 3 * size
    tiny = MemoryKVStore(IDENTITY, capacity_bytes=size - 1)
    assert tiny.put([make_record(0)]) == 0 and tiny.stats.put_failures == 1


def test_open_kv_store_specs(tmp_path) -> None:
    assert isinstance(open_kv_store("memory", 100, IDENTITY), MemoryKVStore)
    disk = open_kv_store(f"disk:{tmp_path / 'kv'}", 100, IDENTITY)
    assert disk.name == f"disk:{tmp_path / 'kv'}"
    disk.close()
    for bad in ("disk:", "s3://bucket", "memory:x"):
        with pytest.raises(KVStoreError):
            open_kv_store(bad, 100, IDENTITY)
    with pytest.raises(KVStoreError, match="capacity"):
        open_kv_store("memory", 0, IDENTITY)


class BrokenStore(MemoryKVStore):
    """A backend whose raw operations raise (a bug, an unmapped connection error)."""

    def _read(self, keys):
        raise ConnectionError("backend down")

    def _write(self, items):
        raise ConnectionError("backend down")

    def _contains(self, keys):
        raise ConnectionError("backend down")

    def _delete(self, keys):
        raise ConnectionError("backend down")


def test_a_raising_backend_is_misses_and_failed_puts_not_errors(caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenStore(IDENTITY, capacity_bytes=10_000)
    with caplog.at_level(logging.ERROR, logger="radixserve.kv_store"):
        assert store.put([make_record(0), make_record(1)]) == 0
        assert store.get([KEYS[0]]) == [None]
        assert store.contains([KEYS[0]]) == [False]
        assert store.delete([KEYS[0]]) == 0
    assert [r.exc_info[1].args for r in caplog.records] == [("backend down",)] * 4
    assert (store.stats.put_failures, store.stats.misses) == (2, 1)


def test_no_store_is_a_null_object() -> None:
    store = open_kv_store(None, 0, IDENTITY)
    assert isinstance(store, NullKVStore) and isinstance(open_kv_store("", 0, IDENTITY), NullKVStore)
    assert store.put([make_record(0)]) == 0
    assert store.get([KEYS[0]]) == [None] and store.contains([KEYS[0]]) == [False] and store.delete([KEYS[0]]) == 0
    assert store.stats.as_dict() == dict.fromkeys(store.stats.as_dict(), 0)
    assert (store.capacity_bytes, store.used_bytes, store.num_records) == (0, 0, 0)

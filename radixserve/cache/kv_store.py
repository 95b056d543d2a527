"""The storage tier: KV blocks by content key, behind one small batched interface.

A store holds *records*: the serialised KV of one full block (every layer's K and V), framed
with a header that names the block's key, the cache identity and the payload layout, and sealed
with a sha256 checksum. Stores move bytes only; turning a block of the runner's KV tensors into
a record and back is radixserve/kv_transfer.py's job, so this layer stays free of tensors.

Record format (version 1), all integers little-endian:

    offset  size  field
    0       8     magic b"RSKVREC\\0"
    8       2     format version (1)
    10      2     flags (0; a record with any other value is refused, so a later format can
                  use them, e.g. to name a faster checksum, without being misread)
    12      4     meta_len: bytes of the JSON meta block
    16      8     payload_len
    24      32    key (BlockKey)
    56      m     meta: UTF-8 JSON {"identity": str, "dtype": str, "shape": [int, ...]}
    56+m    p     payload: the block's KV, C order, shape ``shape``, dtype ``dtype``
    56+m+p  32    sha256 of every byte before it

A record is served only if all of it holds: the length is exactly 56 + m + p + 32, magic and
version are known, the checksum matches, the header key equals the key asked for, the identity
equals the store's, and the payload length equals the layout's byte size. Anything else is a
*corrupt record*: logged, counted, dropped from the backend (so a later put can replace it),
and reported to the caller as a miss. A wrong block is never returned.

``KVStore`` does the framing checks and the read-side counting once for every backend; a
backend implements four raw batched operations over (key, bytes) (``_read``, ``_write``,
``_contains``, ``_delete``) and counts its own write side (bytes written, evictions, failed
puts). A local-disk backend lives in cache/disk_store.py; a Redis/Valkey backend (MGET,
pipelined SET/EXISTS/DEL) or an LMCache/Mooncake-style store plugs in the same way.

Backends never raise from ``get``/``put``/``contains``/``delete`` for I/O trouble (a missing
directory, a full disk, a dropped connection): they log, count and report a miss or a failed
put, because losing a cached block only costs a recompute while raising would fail a request.
``KVStore`` backs that up for backends it does not know: an exception out of a raw operation is
logged with its traceback and turned into misses / failed puts.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from radixserve.cache.block_keys import KEY_SIZE, BlockKey
from radixserve.errors import RadixServeError

log = logging.getLogger("radixserve.kv_store")

RECORD_MAGIC = b"RSKVREC\x00"
RECORD_FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sHHIQ32s")  # magic, version, flags, meta_len, payload_len, key
RECORD_HEADER_SIZE = _FIXED.size  # 56
CHECKSUM_SIZE = 32
MAX_META_LEN = 64 * 1024

# Bytes per element of the dtypes a KV block may hold (torch names without the "torch." prefix).
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class KVStoreError(RadixServeError):
    """A store cannot be opened as configured (bad spec, unusable path, directory in use)."""


class CorruptRecordError(ValueError):
    """A record that must not be served: torn, truncated, tampered with, or for another block."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What the payload bytes are: dtype name and C-order shape of one block's KV.

    The runner writes [num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].
    """

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"unsupported KV dtype {self.dtype!r} (known: {', '.join(DTYPE_ITEMSIZE)})")
        if not all(isinstance(d, int) and d > 0 for d in self.shape):
            raise ValueError(f"KV shape must be positive ints, got {self.shape!r}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


@dataclass(frozen=True, slots=True)
class KVRecord:
    """One block's KV as stored: its key, the identity that computed it, layout and bytes."""

    key: BlockKey
    identity: str  # CacheIdentity.describe()
    layout: KVLayout
    payload: bytes | bytearray | memoryview  # decoded: a view into the bytes read, no copy

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError(f"record key must be {KEY_SIZE} bytes, got {len(self.key)}")
        if len(self.payload) != self.layout.nbytes:
            raise ValueError(f"payload is {len(self.payload)} bytes, layout {self.layout} needs {self.layout.nbytes}")


def encode_record(record: KVRecord) -> bytes:
    """The record's bytes: fixed header, JSON meta, payload, sha256 trailer."""
    meta = json.dumps(
        {"identity": record.identity, "dtype": record.layout.dtype, "shape": list(record.layout.shape)},
        separators=(",", ":"),
        sort_keys=True,
    ).encode("utf-8")
    head = _FIXED.pack(RECORD_MAGIC, RECORD_FORMAT_VERSION, 0, len(meta), len(record.payload), record.key)
    digest = hashlib.sha256(head)
    digest.update(meta)
    digest.update(record.payload)
    return b"".join((head, meta, record.payload, digest.digest()))


def decode_record(data: bytes | bytearray | memoryview, expected_key: BlockKey, expected_identity: str) -> KVRecord:
    """Parse and verify a record; raises CorruptRecordError (with the reason) unless it is the
    intact record of ``expected_key`` under ``expected_identity``."""
    view = memoryview(data)
    if len(view) < RECORD_HEADER_SIZE + CHECKSUM_SIZE:
        raise CorruptRecordError(f"truncated: {len(view)} bytes, shorter than an empty record")
    magic, version, flags, meta_len, payload_len, key = _FIXED.unpack_from(view)
    if magic != RECORD_MAGIC:
        raise CorruptRecordError("bad magic (not a radixserve KV record)")
    if version != RECORD_FORMAT_VERSION or flags != 0:
        raise CorruptRecordError(f"unknown record format version {version} (flags {flags:#x})")
    if meta_len > MAX_META_LEN:
        raise CorruptRecordError(f"meta block of {meta_len} bytes exceeds {MAX_META_LEN}")
    body_end = RECORD_HEADER_SIZE + meta_len + payload_len
    if len(view) != body_end + CHECKSUM_SIZE:
        expected = body_end + CHECKSUM_SIZE
        raise CorruptRecordError(f"length {len(view)} != {expected} declared by the header (truncated?)")
    if hashlib.sha256(view[:body_end]).digest() != bytes(view[body_end:]):
        raise CorruptRecordError("checksum mismatch")
    # Past the checksum the bytes are as written; what remains is whether it is the block asked for.
    if key != expected_key:
        raise CorruptRecordError(f"holds block {key.hex()[:16]}.., asked for {expected_key.hex()[:16]}..")
    try:
        meta = json.loads(bytes(view[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + meta_len]))
        identity = meta["identity"]
        layout = KVLayout(dtype=meta["dtype"], shape=tuple(meta["shape"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecordError(f"bad meta block: {exc}") from None
    if identity != expected_identity:
        raise CorruptRecordError(f"computed under identity {identity!r}, this store serves {expected_identity!r}")
    if layout.nbytes != payload_len:
        raise CorruptRecordError(f"payload is {payload_len} bytes, layout {layout} needs {layout.nbytes}")
    payload = view[RECORD_HEADER_SIZE + meta_len : body_end]  # no copy: a block is MBs
    return KVRecord(key=BlockKey(key), identity=identity, layout=layout, payload=payload)


@dataclass(slots=True)
class KVStoreStats:
    """Monotonic counters of one store (for /metrics)."""

    hits: int = 0  # records served
    misses: int = 0  # keys asked for and not served (absent or corrupt)
    corrupt_records: int = 0  # records found but refused (checksum, truncation, wrong key/identity)
    bytes_read: int = 0  # bytes of records served
    puts: int = 0  # records written
    put_failures: int = 0  # records a put could not store (I/O error, full disk, larger than the store)
    bytes_written: int = 0
    evictions: int = 0  # records dropped to stay within capacity

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class KVStore(abc.ABC):
    """Batched get / put / contains / delete of KV records by content key.

    ``identity`` is the ``CacheIdentity.describe()`` of the engine using the store: records are
    written under it and a record made under another identity is never served. Keys already
    commit to the identity; checking it again costs nothing and catches a store shared by
    mistake. Results come back in the order of the keys asked for.

    Thread safety: the counters are updated under a lock; whether the raw operations may run
    concurrently is the backend's to say (the disk and memory backends allow it).
    """

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.stats = KVStoreStats()
        self._stats_lock = threading.Lock()

    # ---- the interface ----------------------------------------------------------------------
    def get(self, keys: Sequence[BlockKey]) -> list[KVRecord | None]:
        """The verified record of each key, or None (absent, unreadable or corrupt)."""
        if not keys:
            return []
        try:
            raws = self._read(keys)
        except Exception:  # a backend bug or an error it did not map: a miss, not a failed request
            log.exception("KV store %s: get of %d blocks failed; treated as misses", self.name, len(keys))
            raws = [None] * len(keys)
        records: list[KVRecord | None] = []
        corrupt: list[BlockKey] = []
        nbytes = 0
        for key, raw in zip(keys, raws, strict=True):
            record = None
            if raw is not None:
                try:
                    record = decode_record(raw, key, self.identity)
                    nbytes += len(raw)
                except CorruptRecordError as exc:
                    log.warning(
                        "KV store %s: corrupt record for block %s (%s); treated as a miss", self.name, key.hex(), exc
                    )
                    corrupt.append(key)
            records.append(record)
        hits = sum(r is not None for r in records)
        with self._stats_lock:
            self.stats.hits += hits
            self.stats.misses += len(keys) - hits
            self.stats.corrupt_records += len(corrupt)
            self.stats.bytes_read += nbytes
        if corrupt:
            self.delete(corrupt)  # so the next put of that block replaces it
        return records

    def put(self, records: Sequence[KVRecord]) -> int:
        """Store records (a key already held is kept, not rewritten: same key, same content).
        Returns how many are now held; failures are logged and counted, never raised."""
        if not records:
            return 0
        for record in records:
            if record.identity != self.identity:
                raise ValueError(f"record of identity {record.identity!r} put into a store of {self.identity!r}")
        items = [(r.key, encode_record(r)) for r in records]
        try:
            return sum(self._write(items))
        except Exception:
            log.exception("KV store %s: put of %d records failed", self.name, len(items))
            self._count(put_failures=len(items))
            return 0

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether each key is held, without reading or verifying it: a hint, so a True may
        still turn into a miss on ``get`` (a record found corrupt is dropped then)."""
        if not keys:
            return []
        try:
            return self._contains(keys)
        except Exception:
            log.exception("KV store %s: contains of %d keys failed; reported as absent", self.name, len(keys))
            return [False] * len(keys)

    def delete(self, keys: Sequence[BlockKey]) -> int:
        """Drop the keys that are held; returns how many were."""
        if not keys:
            return 0
        try:
            return self._delete(keys)
        except Exception:
            log.exception("KV store %s: delete of %d keys failed", self.name, len(keys))
            return 0

    def close(self) -> None:
        """Release files, connections, locks. The store is unusable afterwards."""

    @property
    def name(self) -> str:
        """A short description for logs ("disk:/var/cache/kv")."""
        return type(self).__name__

    # ---- occupancy (gauges) -----------------------------------------------------------------
    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_records(self) -> int: ...

    # ---- what a backend implements -----------------------------------------------------------
    @abc.abstractmethod
    def _read(self, keys: Sequence[BlockKey]) -> list[bytes | bytearray | None]:
        """The raw bytes stored under each key, or None. Unverified; no counting needed.
        Writable buffers (bytearray) spare the tensor side a copy when it loads the payload."""

    @abc.abstractmethod
    def _write(self, items: Sequence[tuple[BlockKey, bytes]]) -> list[bool]:
        """Store each (key, record bytes) atomically; True where the key is held afterwards.
        Counts puts, put_failures, bytes_written and evictions in ``self.stats``."""

    @abc.abstractmethod
    def _contains(self, keys: Sequence[BlockKey]) -> list[bool]: ...

    @abc.abstractmethod
    def _delete(self, keys: Sequence[BlockKey]) -> int: ...

    def _count(self, **deltas: int) -> None:
        """Add to write-side counters (backends call this)."""
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)


class MemoryKVStore(KVStore):
    """Records in a dict with LRU capacity: the reference backend, for tests and for wiring the
    engine without a disk. Not a host-RAM tier (that one keeps tensors, not records)."""

    def __init__(self, identity: str, capacity_bytes: int) -> None:
        super().__init__(identity)
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._records: OrderedDict[bytes, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "memory"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def num_records(self) -> int:
        return len(self._records)

    def _read(self, keys: Sequence[BlockKey]) -> list[bytes | bytearray | None]:
        out: list[bytes | bytearray | None] = []
        with self._lock:
            for key in keys:
                raw = self._records.get(key)
                if raw is not None:
                    self._records.move_to_end(key)
                out.append(raw)
        return out

    def _write(self, items: Sequence[tuple[BlockKey, bytes]]) -> list[bool]:
        held: list[bool] = []
        written = failed = evicted = nbytes = 0
        with self._lock:
            for key, raw in items:
                if key in self._records:
                    self._records.move_to_end(key)
                    held.append(True)
                    continue
                if len(raw) > self._capacity:
                    failed += 1
                    held.append(False)
                    continue
                while self._used + len(raw) > self._capacity:
                    _, old = self._records.popitem(last=False)
                    self._used -= len(old)
                    evicted += 1
                self._records[key] = raw
                self._used += len(raw)
                written += 1
                nbytes += len(raw)
                held.append(True)
        self._count(puts=written, put_failures=failed, bytes_written=nbytes, evictions=evicted)
        return held

    def _contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        with self._lock:
            return [key in self._records for key in keys]

    def _delete(self, keys: Sequence[BlockKey]) -> int:
        removed = 0
        with self._lock:
            for key in keys:
                raw = self._records.pop(key, None)
                if raw is not None:
                    self._used -= len(raw)
                    removed += 1
        return removed


class NullKVStore(KVStore):
    """No storage tier: the same calls, nothing kept, nothing counted (tiers off is one choice at
    construction, not ``store is None`` checks)."""

    @property
    def name(self) -> str:
        return "none"

    @property
    def capacity_bytes(self) -> int:
        return 0

    @property
    def used_bytes(self) -> int:
        return 0

    @property
    def num_records(self) -> int:
        return 0

    def get(self, keys: Sequence[BlockKey]) -> list[KVRecord | None]:
        return [None] * len(keys)

    def put(self, records: Sequence[KVRecord]) -> int:
        return 0

    def _read(self, keys: Sequence[BlockKey]) -> list[bytes | bytearray | None]:
        return [None] * len(keys)

    def _write(self, items: Sequence[tuple[BlockKey, bytes]]) -> list[bool]:
        return [False] * len(items)

    def _contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        return [False] * len(keys)

    def _delete(self, keys: Sequence[BlockKey]) -> int:
        return 0


def open_kv_store(spec: str | None, capacity_bytes: int, identity: str) -> KVStore:
    """The store a ``--kv-store`` spec names: ``disk:PATH``, ``memory``,
    ``redis://HOST:PORT[/DB][?key_prefix=..&ttl_s=..]`` (or ``valkey://``), or None/"" for none.

    A Redis store's capacity is the server's maxmemory, so ``capacity_bytes`` is not used for it.
    Raises KVStoreError for an unknown scheme or a store that cannot be opened (an unreachable
    Redis is not that: its operations are misses until it answers).
    """
    if not spec:
        return NullKVStore(identity)
    if "://" in spec:  # redis-py is imported only for a Redis store
        from radixserve.cache.redis_store import open_redis_store

        return open_redis_store(spec, identity)
    scheme, _, rest = spec.partition(":")
    if capacity_bytes <= 0:
        raise KVStoreError(f"a KV store needs a positive capacity, got {capacity_bytes} bytes")
    if scheme == "disk" and rest:
        from radixserve.cache.disk_store import DiskKVStore  # the backend imports this module

        return DiskKVStore(rest, capacity_bytes, identity)
    if scheme == "memory" and not rest:
        return MemoryKVStore(identity, capacity_bytes)
    raise KVStoreError(f"unknown KV store {spec!r}: use disk:PATH, memory or redis://HOST:PORT[/DB]")

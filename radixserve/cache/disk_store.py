"""DiskKVStore: the local-disk storage tier (``--kv-store disk:PATH``).

Layout under PATH:

    PATH/lock                          flock'd by the one process that owns the store
    PATH/blocks/ab/ab12...ef.kv        one record per block, named by its key in hex,
                                       fanned out over 256 directories by the key's first byte
    PATH/blocks/ab/.ab12...ef.kv.<pid>.<rand>.tmp   a write in progress (or a killed one's leftover)

Writes are atomic (radixserve.atomic_file: temp file in the same directory, fsync, os.replace),
so a real record name only ever holds a whole record: a process killed mid-write leaves a temp
file, which the next open sweeps. Records are checksummed anyway (kv_store.py), which covers what
atomicity cannot: bit rot, a truncating copy, a power loss with ``fsync=False``.

Capacity is LRU over record bytes (the sum of file sizes, not filesystem blocks). Recency lives
in memory, an OrderedDict of key -> size, and on disk as each file's mtime (set on write, bumped
on every hit), so a restarted process rebuilds the same order from a directory scan and sees the
previous contents. The store makes room before it writes, so the directory never holds more
than the capacity plus the records in flight.

Faults never raise into the engine: a full disk (ENOSPC/EDQUOT) fails the rest of that put
batch, logged and counted; a vanished directory is recreated (its records are gone: misses); an
unreadable or missing file is a miss and leaves the index. Only one process may own a store
directory at a time (two would each enforce their capacity against the same files); a second
one gets KVStoreError at open.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from radixserve.atomic_file import is_temp_file, write_atomically
from radixserve.cache.block_keys import KEY_SIZE, BlockKey
from radixserve.cache.kv_store import KVStore, KVStoreError

log = logging.getLogger("radixserve.kv_store")

RECORD_SUFFIX = ".kv"
_HEX = frozenset("0123456789abcdef")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _key_from_name(name: str) -> BlockKey | None:
    stem = name.removesuffix(RECORD_SUFFIX)
    if name.endswith(RECORD_SUFFIX) and len(stem) == 2 * KEY_SIZE and set(stem) <= _HEX:
        return BlockKey(bytes.fromhex(stem))
    return None


class DiskKVStore(KVStore):
    """One file per block under ``root``, LRU within ``capacity_bytes``; see the module doc.

    fsync: flush each record before its rename. Without it a power loss may leave a short
    record under a real name, which its checksum turns into a miss; a killed process loses
    nothing either way.
    """

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int, identity: str, *, fsync: bool = True) -> None:
        super().__init__(identity)
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.root = Path(root)
        self._blocks_dir = self.root / "blocks"
        self._capacity = capacity_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._recover_lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> record bytes, oldest first
        self._pending: set[bytes] = set()  # keys being written (their bytes are reserved in _used)
        self._used = 0
        self._lock_fd: int | None = None
        self.removed_temp_files = 0  # leftovers of interrupted writes swept at open
        self._take_ownership()
        self._scan()

    # ---- open / close ----------------------------------------------------------------------
    def _take_ownership(self) -> None:
        try:
            self._blocks_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise KVStoreError(f"cannot open KV store directory {self.root}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise KVStoreError(
                f"KV store directory {self.root} is in use by another process; give each server its own"
            ) from None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._lock_fd = fd

    def _scan(self) -> None:
        """Rebuild the LRU index from the files (mtime order) and sweep leftover temp files."""
        found, oversized = self._list_records()
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        evicted = self._make_room(0)
        log.info(
            "KV store %s: %d records, %d of %d bytes%s%s%s",
            self.name,
            len(self._index),
            self._used,
            self._capacity,
            f"; swept {self.removed_temp_files} leftover temp files" if self.removed_temp_files else "",
            f"; evicted {evicted} records over the capacity" if evicted else "",
            f"; ignored {oversized} files larger than the capacity" if oversized else "",
        )

    def _list_records(self) -> tuple[list[tuple[int, bytes, int]], int]:
        """(mtime_ns, key, size) of every record file, and how many files were too large to be
        a record of this store; leftover temp files are deleted on the way."""
        found: list[tuple[int, bytes, int]] = []
        oversized = 0
        for sub in os.scandir(self._blocks_dir):
            if not sub.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(sub.path))
            except OSError as exc:
                log.warning("KV store %s: cannot list %s (%s); its records are ignored", self.name, sub.path, exc)
                continue
            for entry in entries:
                try:
                    if is_temp_file(entry.name):
                        os.unlink(entry.path)
                        self.removed_temp_files += 1
                        continue
                    key = _key_from_name(entry.name)
                    if key is None or sub.name != entry.name[:2] or not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # gone or unreadable meanwhile: not a record we can count on
                    continue
                if st.st_size > self._capacity:  # not a record this store could have written
                    oversized += 1
                    continue
                found.append((st.st_mtime_ns, key, st.st_size))
        return found, oversized

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> DiskKVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- gauges ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"disk:{self.root}"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def num_records(self) -> int:
        return len(self._index)

    # ---- helpers (callers hold no lock unless said) ----------------------------------------
    def path_of(self, key: BlockKey) -> Path:
        """Where the record of ``key`` lives (whether or not it is held)."""
        name = key.hex()
        return self._blocks_dir / name[:2] / (name + RECORD_SUFFIX)

    def _make_room(self, nbytes: int) -> int:
        """Under self._lock: drop LRU records until nbytes more fit; returns how many.

        A record's file is unlinked under the lock, together with its index entry (here and in
        _delete), so no put of the same key can land between the two and lose its new file.
        """
        victims: list[Path] = []
        while self._index and self._used + nbytes > self._capacity:
            key, size = self._index.popitem(last=False)
            self._used -= size
            victims.append(self.path_of(BlockKey(key)))
        self._unlink(victims)
        if victims:
            self._count(evictions=len(victims))
        return len(victims)

    @staticmethod
    def _unlink(paths: Sequence[Path]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _forget(self, key: BlockKey) -> bool:
        """Drop a key whose file could not be read from the index. False if there is nothing to
        drop: evicted or deleted meanwhile, or stored again (its file is back) since the read."""
        with self._lock:
            if key not in self._index or self.path_of(key).exists():
                return False
            self._used -= self._index.pop(key)
        return True

    def _recover_vanished_root(self) -> bool:
        """If the store directory is gone, recreate it and forget what it held. True if it was."""
        if self._blocks_dir.is_dir():
            return False
        with self._recover_lock:  # one thread recreates; the others find it there
            if self._blocks_dir.is_dir():
                return True
            with self._lock:
                lost = len(self._index)
                self._index.clear()
                self._used = 0  # writers in flight add their record back when it lands
                self._pending.clear()
            log.warning("KV store %s: directory vanished, recreating it (%d records lost: misses)", self.name, lost)
            try:
                self._take_ownership()
            except KVStoreError as exc:
                log.warning("KV store %s: %s", self.name, exc)
        return True

    # ---- raw operations --------------------------------------------------------------------
    def _read(self, keys: Sequence[BlockKey]) -> list[bytes | bytearray | None]:
        out: list[bytes | bytearray | None] = []
        for key in keys:
            with self._lock:
                size = self._index.get(key)
            if size is None:
                out.append(None)
                continue
            path = self.path_of(key)
            try:
                with open(path, "rb", buffering=0) as f:
                    # Into a writable buffer, so the runner wraps the payload without copying it;
                    # at most one byte past the size written, which is enough to refuse a file
                    # that grew behind the store's back without reading all of it.
                    raw = bytearray(min(os.fstat(f.fileno()).st_size, size + 1))
                    del raw[f.readinto(raw) or 0 :]
            except FileNotFoundError:
                if self._forget(key) and not self._recover_vanished_root():
                    log.warning("KV store %s: record file of block %s vanished; a miss", self.name, key.hex())
                out.append(None)
                continue
            except OSError as exc:  # unreadable (permissions, I/O error): drop it for good
                self._delete([key])
                log.warning("KV store %s: cannot read block %s (%s); a miss", self.name, key.hex(), exc)
                out.append(None)
                continue
            with self._lock:
                if key in self._index:
                    self._index.move_to_end(key)
            try:
                os.utime(path)  # recency survives a restart
            except OSError:
                pass
            out.append(raw)
        return out

    def _write(self, items: Sequence[tuple[BlockKey, bytes]]) -> list[bool]:
        held: list[bool] = []
        written = nbytes = 0
        failures: list[str] = []
        disk_full: OSError | None = None
        for key, raw in items:
            state = self._reserve(key, len(raw), skip=disk_full is not None)
            if state != "reserved":
                if state == "too large":
                    failures.append(f"{key.hex()[:16]}..: {len(raw)} bytes exceed the capacity")
                held.append(state == "held")
                continue
            ok = False
            try:
                ok = self._write_file(key, raw)
            except OSError as exc:
                failures.append(f"{key.hex()[:16]}..: {exc}")
                if exc.errno in _DISK_FULL:
                    disk_full = exc
            self._settle(key, len(raw), ok)
            if ok:
                written += 1
                nbytes += len(raw)
            held.append(ok)
        failed = held.count(False)
        self._count(puts=written, bytes_written=nbytes, put_failures=failed)
        if failed:
            log.warning(
                "KV store %s: %d of %d records not stored%s: %s",
                self.name,
                failed,
                len(items),
                " (disk full; rest of the batch skipped)" if disk_full is not None else "",
                "; ".join(failures[:3]) + (" ..." if len(failures) > 3 else ""),
            )
        return held

    def _reserve(self, key: BlockKey, size: int, skip: bool) -> str:
        """Before writing a record, under the lock: "held" (stored or being stored already; its
        recency bumped), "skipped" (`skip`: the batch hit a full disk), "too large" (over the
        capacity), or "reserved" (room made, its bytes counted, the key pending)."""
        with self._lock:
            if key in self._index or key in self._pending:
                if key in self._index:
                    self._index.move_to_end(key)
                return "held"
            if skip:
                return "skipped"
            if size > self._capacity:
                return "too large"
            self._make_room(size)
            self._used += size
            self._pending.add(key)
            return "reserved"

    def _settle(self, key: BlockKey, size: int, ok: bool) -> None:
        """After a reserved write, under the lock: index the record, or give its bytes back."""
        with self._lock:
            if key in self._pending:  # else a vanished-root recovery already dropped it
                self._pending.discard(key)
                if ok:
                    self._index[key] = size
                else:
                    self._used -= size
            elif ok:
                self._index[key] = size
                self._used += size

    def _write_file(self, key: BlockKey, raw: bytes) -> bool:
        path = self.path_of(key)
        try:
            write_atomically(path, raw, fsync=self._fsync)
        except FileNotFoundError:
            # The fan-out directory does not exist yet, or the whole store vanished.
            self._recover_vanished_root()
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, raw, fsync=self._fsync)
        return True

    def _contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        with self._lock:
            return [key in self._index for key in keys]

    def _delete(self, keys: Sequence[BlockKey]) -> int:
        paths: list[Path] = []
        with self._lock:  # unlink with the index entry: see _make_room
            for key in keys:
                size = self._index.pop(key, None)
                if size is not None:
                    self._used -= size
                    paths.append(self.path_of(key))
            self._unlink(paths)
        return len(paths)

"""DiskKVStore: records on disk, LRU within capacity, restarts, and every fault the issue names
(corrupt and truncated records, a full disk, a vanished directory, a process killed mid-write)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from radixserve import atomic_file
from radixserve.cache.disk_store import DiskKVStore
from radixserve.cache.kv_store import KVStoreError, encode_record

from tests.cache.store_helpers import IDENTITY, KEYS, make_record

RECORD_SIZE = len(encode_record(make_record(0)))
REPO_ROOT = Path(__file__).resolve().parents[2]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def open_store(root: Path, records: int = 100, **kw) -> DiskKVStore:
    return DiskKVStore(root, records * RECORD_SIZE, IDENTITY, **kw)


def test_round_trip_one_file_per_block_under_fan_out(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        assert store.put([make_record(0), make_record(1)]) == 2
        assert store.get([KEYS[1], KEYS[2], KEYS[0]]) == [make_record(1), None, make_record(0)]
        path = store.path_of(KEYS[0])
        assert path.read_bytes() == encode_record(make_record(0))
        assert path.parent.name == KEYS[0].hex()[:2] and path.name == KEYS[0].hex() + ".kv"
        assert files_under(tmp_path) == sorted(
            ["lock", str(path.relative_to(tmp_path)), str(store.path_of(KEYS[1]).relative_to(tmp_path))]
        )
        assert (store.num_records, store.used_bytes) == (2, 2 * RECORD_SIZE)
        assert (store.stats.puts, store.stats.bytes_written, store.stats.hits, store.stats.misses) == (
            2,
            2 * RECORD_SIZE,
            2,
            1,
        )
        assert store.put([make_record(0)]) == 1 and store.stats.puts == 2  # held: not rewritten


def test_restart_sees_previous_contents_in_lru_order(tmp_path: Path) -> None:
    with open_store(tmp_path, fsync=False) as store:
        store.put([make_record(i) for i in range(3)])
        for age, i in enumerate((2, 1, 0)):  # deterministic recency: 0 newest, 2 oldest
            os.utime(store.path_of(KEYS[i]), (1_000_000 + age, 1_000_000 + age))
        assert store.get([KEYS[2]]) == [make_record(2)]  # a hit bumps the mtime: 2 is newest now
    with open_store(tmp_path, records=3) as store:
        assert store.num_records == 3 and store.contains(KEYS[:3]) == [True, True, True]
        store.put([make_record(3)])  # evicts the least recently used: 1
        assert store.contains(KEYS[:4]) == [True, False, True, True]
        assert not store.path_of(KEYS[1]).exists()
        assert store.get([KEYS[0], KEYS[2]]) == [make_record(0), make_record(2)]


def test_capacity_is_kept_and_a_smaller_capacity_evicts_on_open(tmp_path: Path) -> None:
    with open_store(tmp_path, records=3, fsync=False) as store:
        store.put([make_record(i) for i in range(5)])
        assert store.contains(KEYS[:5]) == [False, False, True, True, True]
        assert store.stats.evictions == 2 and store.used_bytes == 3 * RECORD_SIZE
        assert len([f for f in files_under(tmp_path) if f.endswith(".kv")]) == 3
        too_big = DiskKVStore(tmp_path / "tiny", RECORD_SIZE - 1, IDENTITY)
        assert too_big.put([make_record(0)]) == 0 and too_big.stats.put_failures == 1
        too_big.close()
    for i in range(2, 5):
        os.utime(DiskKVStore.path_of(store, KEYS[i]), (1000 + i, 1000 + i))
    with open_store(tmp_path, records=1) as store:
        assert store.contains(KEYS[2:5]) == [False, False, True]
        assert store.used_bytes == RECORD_SIZE


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), id="flipped-checksum"),
        pytest.param(lambda b: b[:100] + bytes([b[100] ^ 0x80]) + b[101:], id="flipped-payload"),
        pytest.param(lambda b: b + b"junk", id="trailing-junk"),
    ],
)
def test_corrupt_or_truncated_file_is_a_logged_counted_miss(tmp_path: Path, damage, caplog) -> None:
    with open_store(tmp_path) as store:
        store.put([make_record(0), make_record(1)])
        path = store.path_of(KEYS[0])
        path.write_bytes(damage(path.read_bytes()))
        with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
            assert store.get([KEYS[0], KEYS[1]]) == [None, make_record(1)]
        assert "corrupt record" in caplog.text and KEYS[0].hex() in caplog.text
        assert (store.stats.corrupt_records, store.stats.misses, store.stats.hits) == (1, 1, 1)
        assert not path.exists() and store.contains([KEYS[0]]) == [False]
        assert store.used_bytes == RECORD_SIZE
        assert store.put([make_record(0)]) == 1 and store.get([KEYS[0]]) == [make_record(0)]


def test_record_under_another_blocks_name_is_refused(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put([make_record(0), make_record(1)])
        shutil.copyfile(store.path_of(KEYS[0]), store.path_of(KEYS[1]))
    with open_store(tmp_path) as store:  # the scan trusts names; the read checks contents
        assert store.get([KEYS[1]]) == [None]
        assert store.stats.corrupt_records == 1
        assert store.get([KEYS[0]]) == [make_record(0)]


def test_full_disk_fails_the_put_without_crashing(tmp_path: Path, monkeypatch, caplog) -> None:
    with open_store(tmp_path) as store:
        store.put([make_record(0)])

        def write_half_then_enospc(fd: int, data) -> None:
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(atomic_file, "_write_all", write_half_then_enospc)
        with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
            assert store.put([make_record(1), make_record(2), make_record(0)]) == 1  # 0 was held already
        assert "No space left on device" in caplog.text and "disk full" in caplog.text
        assert store.stats.put_failures == 2 and store.stats.puts == 1
        assert store.contains(KEYS[:3]) == [True, False, False]
        assert store.used_bytes == RECORD_SIZE
        assert files_under(tmp_path) == sorted(["lock", str(store.path_of(KEYS[0]).relative_to(tmp_path))])

        monkeypatch.undo()  # space again: the store works as before
        assert store.put([make_record(1)]) == 1 and store.get([KEYS[1]]) == [make_record(1)]


def test_other_write_errors_fail_one_record_not_the_batch(tmp_path: Path, monkeypatch) -> None:
    with open_store(tmp_path) as store:
        calls = []

        def fail_first(fd: int, data) -> None:
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")
            os.write(fd, bytes(data))

        monkeypatch.setattr(atomic_file, "_write_all", fail_first)
        assert store.put([make_record(0), make_record(1)]) == 1
        assert store.contains(KEYS[:2]) == [False, True] and store.stats.put_failures == 1


def test_vanished_store_directory_is_a_miss_then_recreated(tmp_path: Path, caplog) -> None:
    root = tmp_path / "kv"
    with open_store(root) as store:
        store.put([make_record(0), make_record(1)])
        shutil.rmtree(root)
        with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
            assert store.get([KEYS[0], KEYS[1]]) == [None, None]
        assert "vanished" in caplog.text
        assert store.num_records == 0 and store.used_bytes == 0
        assert store.put([make_record(2)]) == 1
        assert store.get([KEYS[2]]) == [make_record(2)]
        assert (root / "lock").exists()
        # Vanishing between puts (no read noticed it) is recovered by the write itself.
        shutil.rmtree(root)
        assert store.put([make_record(3)]) == 1 and store.get([KEYS[3]]) == [make_record(3)]
        assert store.contains([KEYS[2]]) == [False]


def test_a_single_vanished_file_is_a_miss(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put([make_record(0), make_record(1)])
        os.unlink(store.path_of(KEYS[0]))
        assert store.get([KEYS[0], KEYS[1]]) == [None, make_record(1)]
        assert store.num_records == 1 and store.used_bytes == RECORD_SIZE


def test_one_owner_per_directory(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(KVStoreError, match="in use by another process"):
        open_store(tmp_path)
    store.close()
    open_store(tmp_path).close()


def test_open_sweeps_temp_files_and_ignores_strays(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put([make_record(0)])
        real = store.path_of(KEYS[0])
    leftover = atomic_file.temp_path_for(real)
    leftover.write_bytes(b"half a rec")
    (real.parent / "notes.txt").write_text("not a record")
    (tmp_path / "blocks" / "README").write_text("hello")
    with open_store(tmp_path) as store:
        assert store.removed_temp_files == 1 and not leftover.exists()
        assert store.num_records == 1 and store.used_bytes == RECORD_SIZE
        assert (real.parent / "notes.txt").exists()


KILL_MID_WRITE = textwrap.dedent(
    """
    import os, sys, time
    from radixserve import atomic_file
    from radixserve.cache.disk_store import DiskKVStore
    from tests.cache.store_helpers import IDENTITY, make_record

    store = DiskKVStore(sys.argv[1], 10**6, IDENTITY, fsync=True)
    store.put([make_record(0)])

    def stall_half_way(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        print("half-written", flush=True)
        time.sleep(60)  # killed here

    atomic_file._write_all = stall_half_way
    store.put([make_record(1)])
    print("not killed?!", flush=True)
    """
)


def test_process_killed_mid_write_leaves_no_half_record(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_MID_WRITE, str(root)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
    )
    try:
        assert proc.stdout.readline().strip() == "half-written"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    temps = [p for p in root.rglob("*.tmp")]
    assert len(temps) == 1  # the interrupted write, under a temp name only

    with open_store(root) as store:  # the flock died with the process
        assert store.removed_temp_files == 1 and not any(root.rglob("*.tmp"))
        assert store.contains([KEYS[0], KEYS[1]]) == [True, False]
        assert not store.path_of(KEYS[1]).exists()
        assert store.get([KEYS[0], KEYS[1]]) == [make_record(0), None]
        assert store.stats.corrupt_records == 0
        assert store.put([make_record(1)]) == 1 and store.get([KEYS[1]]) == [make_record(1)]


KILL_IN_A_WRITE_LOOP = textwrap.dedent(
    """
    import sys
    from radixserve.cache.disk_store import DiskKVStore
    from tests.cache.store_helpers import IDENTITY, make_record

    store = DiskKVStore(sys.argv[1], 10**6, IDENTITY, fsync=False)
    i = 0
    while True:
        store.put([make_record(i % 40)])
        store.delete([make_record((i + 20) % 40).key])
        i += 1
        if i == 50:
            print("looping", flush=True)
    """
)


def test_process_killed_in_a_write_loop_leaves_only_whole_records(tmp_path: Path) -> None:
    """Killed at an arbitrary point of a put/delete loop: every record left is intact."""
    root = tmp_path / "kv"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", KILL_IN_A_WRITE_LOOP, str(root)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    try:
        assert proc.stdout.readline().strip() == "looping"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    with open_store(root) as store:
        held = [i for i, h in enumerate(store.contains(KEYS[:40])) if h]
        assert held
        assert store.get([KEYS[i] for i in held]) == [make_record(i) for i in held]
        assert store.stats.corrupt_records == 0 and not any(root.rglob("*.tmp"))


def test_unusable_path_is_a_clear_error_at_open(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(KVStoreError, match="cannot open KV store directory"):
        open_store(not_a_dir)
    with pytest.raises(ValueError, match="capacity"):
        DiskKVStore(tmp_path / "kv", 0, IDENTITY)


def test_a_file_grown_behind_the_stores_back_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    with open_store(tmp_path, records=3) as store:
        store.put([make_record(0)])
        with open(store.path_of(KEYS[0]), "ab") as f:
            f.write(b"\x00" * 10 * RECORD_SIZE)
        assert store.get([KEYS[0]]) == [None] and store.stats.corrupt_records == 1
        assert store.used_bytes == 0
    # At open, a file larger than the whole capacity is not indexed (it cannot be our record).
    big = DiskKVStore.path_of(store, KEYS[1])
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(b"\x00" * 4 * RECORD_SIZE)
    with open_store(tmp_path, records=3) as store:
        assert store.num_records == 0 and store.contains([KEYS[1]]) == [False]


def test_concurrent_puts_gets_and_deletes_keep_the_books(tmp_path: Path) -> None:
    """Threads hammering overlapping keys: every hit is the right record, and afterwards the
    index, the byte count and the files on disk agree."""
    import random
    import threading

    store = open_store(tmp_path, records=8, fsync=False)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            i = rng.randrange(16)
            op = rng.random()
            if op < 0.5:
                store.put([make_record(i)])
            elif op < 0.9:
                got = store.get([KEYS[i]])[0]
                if got is not None and got != make_record(i):
                    errors.append(f"block {i} served wrong bytes")
            else:
                store.delete([KEYS[i]])

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.stats.corrupt_records == 0
    records = sorted(p for p in tmp_path.rglob("*.kv"))
    assert len(records) == store.num_records <= 8
    assert store.used_bytes == store.num_records * RECORD_SIZE == sum(p.stat().st_size for p in records)
    assert not list(tmp_path.rglob("*.tmp"))
    store.close()

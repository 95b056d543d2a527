"""RedisKVStore against a real redis-server on a loopback port: round trips, batching, identity
separation, corrupt values, eviction under maxmemory, and the faults of issue #14 (server killed,
unreachable at start, hung) with reconnection."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from radixserve.cache.kv_store import KVStoreError, encode_record, open_kv_store
from radixserve.cache.redis_store import (
    CONNECT_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    RedisKVStore,
    identity_hash,
    parse_redis_spec,
)
from radixserve.cache.store_writer import StoreWriter
from tests.cache.store_helpers import IDENTITY, KEYS, LAYOUT, make_record
from tests.redis_server import RedisServer, find_redis_server, free_port

OTHER_IDENTITY = "other@def/float16;block_size=2;kv_layout=1"
FAST_RETRY = {"retry_min_s": 0.05, "retry_max_s": 0.2}  # keeps the reconnect tests short


def open_store(server: RedisServer, identity: str = IDENTITY, **kw) -> RedisKVStore:
    return RedisKVStore(server.url, identity, info_max_age_s=0, **kw)


def wait_until(predicate, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_round_trip_batched_and_key_layout(redis_server: RedisServer) -> None:
    store = open_store(redis_server)
    assert store.put([make_record(i) for i in range(5)]) == 5
    assert store.get([KEYS[3], KEYS[9], KEYS[0]]) == [make_record(3), None, make_record(0)]
    assert store.contains(KEYS[:6]) == [True] * 5 + [False]
    client = redis_server.client()
    assert client.get(f"rskv:{identity_hash(IDENTITY)}:{KEYS[2].hex()}") == encode_record(make_record(2))
    assert sorted(client.keys("*")) == sorted(store.redis_key(k).encode() for k in KEYS[:5])
    assert store.put([make_record(0), make_record(5)]) == 2  # 0 is held: kept, not rewritten
    assert (store.stats.puts, store.stats.bytes_written) == (6, 6 * len(encode_record(make_record(0))))
    assert (store.stats.hits, store.stats.misses) == (2, 1)
    assert store.delete([KEYS[0], KEYS[1], KEYS[30]]) == 2
    assert store.contains(KEYS[:3]) == [False, False, True]
    assert store.num_records == 4 and store.used_bytes > 0 and store.capacity_bytes == 0  # no maxmemory
    assert store.available and store.outages == 0
    store.close()


def test_batches_are_one_round_trip_each(redis_server: RedisServer) -> None:
    store = open_store(redis_server)
    client = redis_server.client()
    before = client.info("stats")["total_commands_processed"]
    store.put([make_record(i) for i in range(20)])
    store.get(KEYS[:20])
    store.contains(KEYS[:20])
    store.delete(KEYS[:20])
    calls = {name: stat["calls"] for name, stat in client.info("commandstats").items()}
    assert calls["cmdstat_mget"] == 1 and calls["cmdstat_unlink"] == 1
    assert calls["cmdstat_set"] == 20 and calls["cmdstat_exists"] == 20  # pipelined
    assert client.info("stats")["total_commands_processed"] - before < 50


def test_two_identities_on_one_redis_never_see_each_other(redis_server: RedisServer) -> None:
    mine, theirs = open_store(redis_server), open_store(redis_server, OTHER_IDENTITY)
    assert mine.key_prefix != theirs.key_prefix
    mine.put([make_record(0)])
    theirs.put([make_record(1, identity=OTHER_IDENTITY)])
    # Same block keys on both sides (a misconfigured caller): still disjoint key ranges.
    assert theirs.get(KEYS[:2]) == [None, make_record(1, identity=OTHER_IDENTITY)]
    assert mine.get(KEYS[:2]) == [make_record(0), None]
    assert mine.contains(KEYS[:2]) == [True, False] and theirs.contains(KEYS[:2]) == [False, True]
    assert mine.delete(KEYS[:2]) == 1 and theirs.contains(KEYS[:2]) == [False, True]
    # A record of the other identity copied under my key is refused by the identity check.
    client = redis_server.client()
    client.set(mine.redis_key(KEYS[1]), client.get(theirs.redis_key(KEYS[1])))
    assert mine.get([KEYS[1]]) == [None] and mine.stats.corrupt_records == 1
    # A key prefix of one's own separates deployments too.
    assert open_store(redis_server, key_prefix="staging:").get(KEYS[:2]) == [None, None]


@pytest.mark.parametrize("damage", ["garbage", "flipped", "truncated", "other-block", "empty"])
def test_corrupt_values_are_logged_misses_and_dropped(redis_server: RedisServer, damage: str, caplog) -> None:
    store = open_store(redis_server)
    store.put([make_record(0)])
    raw = encode_record(make_record(0))
    bad = {
        "garbage": b"not a record at all",
        "flipped": raw[:100] + bytes([raw[100] ^ 1]) + raw[101:],
        "truncated": raw[:-10],
        "other-block": encode_record(make_record(1)),
        "empty": b"",
    }[damage]
    client = redis_server.client()
    client.set(store.redis_key(KEYS[0]), bad)
    with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
        assert store.get([KEYS[0]]) == [None]
    assert "corrupt record" in caplog.text and KEYS[0].hex() in caplog.text
    assert store.stats.corrupt_records == 1 and store.stats.misses == 1
    assert client.exists(store.redis_key(KEYS[0])) == 0  # dropped, so the next put replaces it
    assert store.put([make_record(0)]) == 1 and store.get([KEYS[0]]) == [make_record(0)]


def test_a_value_of_another_type_is_a_miss(redis_server: RedisServer) -> None:
    store = open_store(redis_server)
    redis_server.client().rpush(store.redis_key(KEYS[0]), b"x")  # MGET reads a non-string as nil
    assert store.get([KEYS[0]]) == [None] and store.stats.misses == 1


def test_ttl_and_spec_options(redis_server: RedisServer) -> None:
    store = open_kv_store(f"{redis_server.url}?ttl_s=30&key_prefix=t:", 0, IDENTITY)
    assert isinstance(store, RedisKVStore) and store.key_prefix.startswith("t:")
    store.put([make_record(0)])
    assert 29_000 < redis_server.client().pttl(store.redis_key(KEYS[0])) <= 30_000
    assert open_kv_store(f"valkey://127.0.0.1:{redis_server.port}", 0, IDENTITY).get([KEYS[0]]) == [None]
    url, options = parse_redis_spec("redis://:secret@host:7000/2?socket_timeout=2&ttl_s=5")
    assert url == "redis://:secret@host:7000/2?socket_timeout=2" and options == {"ttl_s": 5.0}
    assert "secret" not in RedisKVStore(url, IDENTITY).name  # no server there: still opens
    for bad in ("redis://", "redis://h:1?ttl_s=soon", "redis://h:1?no_such_option=1", "redis://h:1?ttl_s=-1"):
        with pytest.raises(KVStoreError):
            open_kv_store(bad, 0, IDENTITY)


def test_allkeys_lru_maxmemory_evicts_instead_of_failing(redis_server: RedisServer) -> None:
    client = redis_server.client()
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory", used + 2_000_000)
    client.config_set("maxmemory-policy", "allkeys-lru")
    store = open_store(redis_server)
    big = LAYOUT.__class__("uint8", (64 * 1024,))
    records = [make_record(0).__class__(KEYS[i], IDENTITY, big, bytes([i]) * big.nbytes) for i in range(40)]
    for i in range(0, 40, 4):  # 2.6 MB in all, more than fits
        assert store.put(records[i : i + 4]) == 4
    held = store.contains(KEYS[:40])
    assert not all(held) and all(held[-4:]) and store.stats.put_failures == 0
    assert store.capacity_bytes == used + 2_000_000


def test_noeviction_when_full_fails_puts_without_raising(redis_server: RedisServer, caplog) -> None:
    client = redis_server.client()
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 100_000)
    client.config_set("maxmemory-policy", "noeviction")
    with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
        store = open_store(redis_server)
        assert "noeviction" in caplog.text
        big = LAYOUT.__class__("uint8", (64 * 1024,))
        records = [make_record(0).__class__(KEYS[i], IDENTITY, big, bytes(big.nbytes)) for i in range(4)]
        assert store.put(records) < 4
    assert store.stats.put_failures >= 1 and "maxmemory" in caplog.text
    assert store.available  # a refused write is not an outage


def test_a_store_writer_thread_and_readers_share_one_store(redis_server: RedisServer) -> None:
    store = open_store(redis_server)
    writer = StoreWriter(store, max_pending_bytes=1 << 20)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(30):
                for i, rec in enumerate(store.get(KEYS[:40])):
                    assert rec is None or rec == make_record(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(0, 40, 5):
        writer.submit([make_record(j) for j in range(i, i + 5)])
    assert writer.flush(timeout=10)
    for t in readers:
        t.join()
    writer.close()
    assert not errors and store.get(KEYS[:40]) == [make_record(i) for i in range(40)]
    assert store.stats.puts == 40 and store.stats.corrupt_records == 0


# ---- faults: the server killed, absent at start, hung -------------------------------------------
def test_server_killed_mid_run_then_restarted(redis_server: RedisServer, caplog) -> None:
    store = open_store(redis_server, **FAST_RETRY)
    store.put([make_record(i) for i in range(3)])
    assert store.num_records == 3
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
        start = time.monotonic()
        assert store.get(KEYS[:3]) == [None] * 3
        assert store.put([make_record(3)]) == 0
        assert store.contains(KEYS[:3]) == [False] * 3
        assert store.delete(KEYS[:3]) == 0
        assert store.num_records == 3  # the last known value; no exception from a gauge
        assert time.monotonic() - start < 1.0  # refused at once; the breaker skips the rest
    assert "unreachable" in caplog.text and caplog.text.count("unreachable") == 1  # once per outage
    assert not store.available and store.outages == 1 and store.unavailable_ops >= 4
    assert (store.stats.misses, store.stats.put_failures) == (3, 1)
    redis_server.start()  # same port, empty (no persistence)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
        wait_until(lambda: store.put([make_record(4)]) == 1)
    assert store.available and "reachable again" in caplog.text
    assert store.get(KEYS[:5]) == [None] * 4 + [make_record(4)]  # the killed server's data is gone


@pytest.mark.parametrize("operation", ["get", "put", "contains", "delete"])
def test_each_operation_first_after_a_kill_is_a_clean_failure(redis_server: RedisServer, operation: str) -> None:
    store = open_store(redis_server)
    store.put([make_record(0)])  # leaves a pooled connection the kill makes stale
    redis_server.kill()
    result = {
        "get": lambda: store.get(KEYS[:2]),
        "put": lambda: store.put([make_record(1)]),
        "contains": lambda: store.contains(KEYS[:2]),
        "delete": lambda: store.delete(KEYS[:2]),
    }[operation]()
    assert result == {"get": [None, None], "put": 0, "contains": [False, False], "delete": 0}[operation]
    assert not store.available and store.outages == 1 and store.unavailable_ops == 1
    assert store.stats.put_failures == (operation == "put") and store.stats.misses == 2 * (operation == "get")


def test_server_absent_at_start_then_comes_up(caplog) -> None:
    executable = find_redis_server()
    if executable is None:
        pytest.skip("redis-server not found (scripts/setup-venv.sh installs it: apt-get install redis-server)")
    server = RedisServer(executable, port=free_port())
    try:
        with caplog.at_level(logging.WARNING, logger="radixserve.kv_store"):
            store = open_kv_store(server.url, 1, IDENTITY)  # opens: nothing is listening yet
            assert "unreachable" in caplog.text
        assert isinstance(store, RedisKVStore) and not store.available
        assert store.get(KEYS[:2]) == [None, None] and store.put([make_record(0)]) == 0
        assert store.capacity_bytes == 0 and store.used_bytes == 0
        server.start()
        wait_until(lambda: store.put([make_record(0)]) == 1, timeout_s=5)  # retry interval 0.5 s
        assert store.get([KEYS[0]]) == [make_record(0)] and store.available
    finally:
        server.close()


def test_a_hung_server_costs_one_socket_timeout_per_retry_interval(redis_server: RedisServer) -> None:
    store = open_store(redis_server, **FAST_RETRY)
    store.put([make_record(0)])
    redis_server.pause()  # accepts bytes, never answers
    try:
        start = time.monotonic()
        assert store.get([KEYS[0]]) == [None]
        first = time.monotonic() - start
        assert SOCKET_TIMEOUT_S * 0.9 < first < SOCKET_TIMEOUT_S + 1.0  # slack for a loaded CI box
        start = time.monotonic()
        for _ in range(100):  # an engine stepping meanwhile: answered without waiting
            assert store.get([KEYS[0]]) == [None]
        assert time.monotonic() - start < 0.2
    finally:
        redis_server.resume()
    wait_until(lambda: store.get([KEYS[0]]) == [make_record(0)])
    assert store.outages == 1 and CONNECT_TIMEOUT_S < SOCKET_TIMEOUT_S


def test_breaker_backs_off_and_one_probe_per_interval(redis_server: RedisServer) -> None:
    store = open_store(redis_server, retry_min_s=0.1, retry_max_s=0.4)
    redis_server.kill()
    probes = 0
    original = store._client.mget

    def counting_mget(*args, **kwargs):
        nonlocal probes
        probes += 1
        return original(*args, **kwargs)

    store._client.mget = counting_mget
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        store.get([KEYS[0]])
        time.sleep(0.005)
    # Probes at ~0, 0.1, 0.3, 0.7 s (backoff 0.1 -> 0.2 -> 0.4, capped): a handful, not ~200.
    assert 3 <= probes <= 6, probes

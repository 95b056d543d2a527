"""RedisKVStore: the storage tier shared by replicas, on Redis or Valkey (``--kv-store redis://HOST:PORT[/DB]``).

Key layout, one Redis string per block:

    <key_prefix><identity hash>:<block key hex>      e.g. rskv:3fa29c0e51d2b7a4:ab12...ef
    value: the checksummed record of kv_store.py

``identity hash`` is the first 16 hex digits of sha256(CacheIdentity.describe()). Block keys
already commit to the identity, so this is belt and braces: two models sharing one Redis live
under disjoint key ranges (``SCAN MATCH rskv:<hash>:*`` lists or drops one model's blocks), and
the record header's identity is checked on every load anyway (kv_store.py).

Operations, each one round trip: get = MGET, put = a pipeline of ``SET key value NX [PX ttl]``
(a held key is kept, not rewritten), contains = a pipeline of EXISTS (which does not touch the
LRU clock), delete = UNLINK (frees a multi-MB value off Redis's main thread).

Capacity is Redis's: ``maxmemory`` plus ``maxmemory-policy allkeys-lru`` evicts the least
recently used blocks (MGET hits refresh recency). The store does not enforce a byte budget of
its own, because several replicas write to one server; ``capacity_bytes`` / ``used_bytes`` /
``num_records`` report the server's maxmemory, used memory and the DB's key count (one INFO
call, cached for a second). At connect the store warns if the server has no maxmemory or a
policy that will refuse writes (``noeviction``) or never evict (``volatile-*`` without a TTL).

Faults never reach the engine. Connect timeout 0.25 s, socket (read/write) timeout 0.5 s, one
immediate retry on a dropped connection (so a stale pooled socket after a server restart costs
nothing) and none on a timeout. An operation that cannot reach the server opens a circuit
breaker: for the next 0.5 s, doubling per failed probe up to 8 s, every operation is a miss /
failed put at once, without touching the network; then one operation probes, and the first that
succeeds closes it (logged with the outage's length). So a dead or hung Redis costs at most one
timeout per retry interval, never one per step. Refused writes (OOM under ``noeviction``,
READONLY on a replica) are counted put failures.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from radixserve.cache.block_keys import BlockKey
from radixserve.cache.kv_store import KVStore, KVStoreError

log = logging.getLogger("radixserve.kv_store")

DEFAULT_KEY_PREFIX = "rskv:"
CONNECT_TIMEOUT_S = 0.25
SOCKET_TIMEOUT_S = 0.5
RETRY_MIN_S = 0.5
RETRY_MAX_S = 8.0
INFO_MAX_AGE_S = 1.0
# Bytes per recv: a block's record is MBs, and with hiredis 4 MiB reads MGET at ~1.1 GB/s where
# redis-py's 32 KiB default gives ~0.6 (loopback, this 2-core box); one such buffer per connection.
SOCKET_READ_SIZE = 4 * 2**20
SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
# Errors that mean "the server is not there (or not answering)": they open the breaker.
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

T = TypeVar("T")


def identity_hash(identity: str) -> str:
    """The 16 hex digits that name an identity's key range."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def parse_redis_spec(spec: str) -> tuple[str, dict[str, object]]:
    """Split a spec into the URL for redis-py and our own options (``key_prefix``, ``ttl_s``).

    ``valkey://`` / ``valkeys://`` are accepted as ``redis://`` / ``rediss://``; other query
    parameters (``socket_timeout``, ``password``, ...) are redis-py's and override our defaults.
    """
    parts = urlsplit(spec)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise KVStoreError(f"bad KV store spec {spec!r}: use redis://HOST:PORT[/DB][?key_prefix=..&ttl_s=..]")
    options: dict[str, object] = {}
    rest = []
    for name, value in parse_qsl(parts.query):
        if name == "key_prefix":
            options["key_prefix"] = value
        elif name == "ttl_s":
            try:
                options["ttl_s"] = float(value)
            except ValueError:
                raise KVStoreError(f"bad ttl_s {value!r} in {spec!r}: seconds, e.g. ttl_s=86400") from None
        else:
            rest.append((name, value))
    url = urlunsplit((SCHEMES[parts.scheme], parts.netloc, parts.path, urlencode(rest), ""))
    return url, options


def _connection_pool(url: str, connect_timeout_s: float, socket_timeout_s: float) -> redis.ConnectionPool:
    """redis-py's pool for `url` with our timeouts and retry rule; KVStoreError for a bad URL or
    option (found here, by building one connection object, not at every operation)."""
    try:
        pool = redis.ConnectionPool.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            socket_read_size=SOCKET_READ_SIZE,
            # One immediate retry on a dropped connection (a pooled socket the server closed
            # or a restart reset), none on a timeout: a hung server costs one timeout.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError) as exc:
        raise KVStoreError(f"bad Redis KV store URL {url!r}: {exc}") from None
    return pool


class RedisKVStore(KVStore):
    """KV records in Redis/Valkey under ``<key_prefix><identity hash>:<key hex>``; see the module doc.

    url: ``redis://[user:password@]HOST:PORT[/DB][?socket_timeout=..]`` (redis-py's URL).
    ttl_s: expire each record this long after it is written (None: only maxmemory evicts).
    The constructor never fails for an unreachable server (its operations are misses until it
    answers); a malformed URL or option raises KVStoreError. Thread-safe (redis-py's pool).
    """

    def __init__(
        self,
        url: str,
        identity: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_s: float | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
        info_max_age_s: float = INFO_MAX_AGE_S,
    ) -> None:
        super().__init__(identity)
        if ttl_s is not None and ttl_s <= 0:
            raise KVStoreError(f"ttl_s must be positive, got {ttl_s}")
        self._url = url
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self.key_prefix = f"{key_prefix}{identity_hash(identity)}:"
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._info_max_age_s = info_max_age_s
        self._pool = _connection_pool(url, connect_timeout_s, socket_timeout_s)
        self._client = redis.Redis(connection_pool=self._pool)
        self._state_lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time of the first failure, None while up
        self._next_probe = 0.0
        self._backoff_s = retry_min_s
        self._skipped = 0  # operations answered without the server during the current outage
        self.outages = 0  # times the server became unreachable
        self.unavailable_ops = 0  # operations that failed or were skipped because it was
        self._info: dict[str, int] = {"maxmemory": 0, "used_memory": 0, "keys": 0}
        self._info_at = -float("inf")
        self._call("connect", self._check_server, counted=False)

    # ---- gauges ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        parts = urlsplit(self._url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # never the password

    @property
    def capacity_bytes(self) -> int:
        """The server's maxmemory (0: unlimited), shared by everything in it."""
        return self._server_info()["maxmemory"]

    @property
    def used_bytes(self) -> int:
        """The server's used memory (all identities, all DBs)."""
        return self._server_info()["used_memory"]

    @property
    def num_records(self) -> int:
        """Keys in this DB (all identities: give the tier its own DB to read it as records)."""
        return self._server_info()["keys"]

    @property
    def available(self) -> bool:
        """False while the breaker is open (the last operation could not reach the server)."""
        return self._down_since is None

    def redis_key(self, key: BlockKey) -> str:
        return self.key_prefix + key.hex()

    def close(self) -> None:
        self._pool.disconnect()

    # ---- raw operations --------------------------------------------------------------------
    def _read(self, keys: Sequence[BlockKey]) -> list[bytes | bytearray | None]:
        got = self._call("get", lambda: self._client.mget([self.redis_key(k) for k in keys]))
        return [None] * len(keys) if got is None else list(got)

    def _write(self, items: Sequence[tuple[BlockKey, bytes]]) -> list[bool]:
        def run() -> list[object]:
            pipe = self._client.pipeline(transaction=False)
            for key, raw in items:
                pipe.set(self.redis_key(key), raw, nx=True, px=self._ttl_ms)
            return pipe.execute(raise_on_error=False)

        results = self._call("put", run)
        if results is None:
            self._count(put_failures=len(items))
            return [False] * len(items)
        held: list[bool] = []
        written = nbytes = 0
        errors: list[str] = []
        for (key, raw), result in zip(items, results, strict=True):
            if isinstance(result, Exception):  # OOM under noeviction, READONLY replica, ...
                errors.append(f"{key.hex()[:16]}..: {result}")
                held.append(False)
                continue
            if result:  # written now; None: already held (NX), kept as it is
                written += 1
                nbytes += len(raw)
            held.append(True)
        self._count(puts=written, bytes_written=nbytes, put_failures=len(errors))
        if errors:
            log.warning(
                "KV store %s: %d of %d records not stored: %s",
                self.name,
                len(errors),
                len(items),
                "; ".join(errors[:3]) + (" ..." if len(errors) > 3 else ""),
            )
        return held

    def _contains(self, keys: Sequence[BlockKey]) -> list[bool]:
        def run() -> list[object]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.redis_key(key))
            return pipe.execute()

        found = self._call("contains", run)
        return [False] * len(keys) if found is None else [bool(n) for n in found]

    def _delete(self, keys: Sequence[BlockKey]) -> int:
        removed = self._call("delete", lambda: self._client.unlink(*[self.redis_key(k) for k in keys]))
        return removed or 0

    # ---- the breaker -----------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, counted: bool = True) -> T | None:
        """fn() if the server answers; None (logged, counted unless not ``counted``: a gauge) if it
        is unreachable or the breaker is open. Other Redis errors propagate (KVStore logs them
        and reports misses)."""
        probing = False
        with self._state_lock:
            if self._down_since is not None:
                now = time.monotonic()
                if now < self._next_probe:
                    if counted:
                        self._skipped += 1
                        self.unavailable_ops += 1
                    return None
                self._next_probe = now + self._backoff_s  # this call probes; the others skip
                probing = True
        try:
            result = fn()
        except _UNREACHABLE as exc:
            self._mark_down(what, exc, probing=probing, counted=counted)
            return None
        if self._down_since is not None:
            self._mark_up()
        return result

    def _mark_down(self, what: str, exc: BaseException, *, probing: bool, counted: bool) -> None:
        with self._state_lock:
            if counted:
                self.unavailable_ops += 1
            now = time.monotonic()
            first = self._down_since is None
            if first:
                self._down_since = now
                self._backoff_s = self._retry_min_s
                self._skipped = 0
                self.outages += 1
                self._next_probe = now + self._backoff_s
            elif probing:  # a failed probe backs off; an operation that was in flight does not
                self._backoff_s = min(2 * self._backoff_s, self._retry_max_s)
                self._next_probe = now + self._backoff_s
            backoff = self._backoff_s
        self._pool.disconnect(inuse_connections=False)  # stale sockets: reconnect fresh
        if first:
            log.warning(
                "KV store %s: unreachable (%s failed: %s: %s); storage-tier reads are misses and writes "
                "fail until it answers, next try in %.2f s",
                self.name,
                what,
                type(exc).__name__,
                exc,
                backoff,
            )
        else:
            log.debug("KV store %s: still unreachable (%s); next try in %.2f s", self.name, exc, backoff)

    def _mark_up(self) -> None:
        with self._state_lock:
            if self._down_since is None:
                return
            outage = time.monotonic() - self._down_since
            skipped = self._skipped
            self._down_since = None
            self._backoff_s = self._retry_min_s
        log.warning(
            "KV store %s: reachable again after %.1f s (%d operations answered as misses meanwhile)",
            self.name,
            outage,
            skipped,
        )
        self._call("reconnect", self._check_server, counted=False)

    # ---- server facts ----------------------------------------------------------------------
    def _check_server(self) -> None:
        """Warn about a configuration under which the tier cannot work as a cache."""
        info = self._client.info("memory")
        self._remember_info(info, self._client.dbsize())
        maxmemory = int(info.get("maxmemory", 0))
        policy = str(info.get("maxmemory_policy", "?"))
        if maxmemory == 0:
            log.warning(
                "KV store %s: the server has no maxmemory, so the tier grows until the host runs out of memory; "
                "set maxmemory and maxmemory-policy allkeys-lru (docs/internals.md, Tiers)",
                self.name,
            )
        elif policy == "noeviction" or (policy.startswith("volatile") and self._ttl_ms is None):
            log.warning(
                "KV store %s: maxmemory-policy %s never evicts these records, so puts fail once the server is "
                "full; use allkeys-lru",
                self.name,
                policy,
            )
        else:
            log.info("KV store %s: maxmemory %d bytes, policy %s", self.name, maxmemory, policy)

    def _server_info(self) -> dict[str, int]:
        """maxmemory, used_memory and the DB's key count, at most info_max_age_s old; the last
        known values while the server is unreachable."""
        if time.monotonic() - self._info_at >= self._info_max_age_s:
            self._call(
                "info", lambda: self._remember_info(self._client.info("memory"), self._client.dbsize()), counted=False
            )
        return dict(self._info)

    def _remember_info(self, memory: dict, keys: int) -> None:
        self._info["maxmemory"] = int(memory.get("maxmemory", 0))
        self._info["used_memory"] = int(memory.get("used_memory", 0))
        self._info["keys"] = int(keys)
        self._info_at = time.monotonic()


def open_redis_store(spec: str, identity: str) -> RedisKVStore:
    """The store of a ``redis://`` / ``valkey://`` spec (open_kv_store's Redis branch)."""
    url, options = parse_redis_spec(spec)
    return RedisKVStore(url, identity, **options)  # type: ignore[arg-type]

"""ClusterState: the one small Ray actor every replica and router of an application shares.

It holds what must outlive any single replica or router:
- the KV event relay: replicas publish batches here; the actor keeps each replica's key set
  (a PrefixIndex) and a bounded log of recent batches, and a router pulls what it has not seen
  (``updates(cursor)``), or a full snapshot when it is new or fell behind; ``wait_for_updates``
  is the same as a long poll (a router hears of a batch as soon as it lands, and an idle one
  asks once a second instead of 20 times). A replica that stops publishing for
  ``replica_ttl_s`` is dropped (its entries expire);
- named-cache definitions, so a cache created through one replica works through all, and a
  router or replica restart loses none (a Ray actor rather than Redis: it needs no extra
  server, and definitions are a few KB each; the KV bytes themselves go to the storage tier);
- the routing profile (tokenizer + cache identity) replicas register for the ingress;
- the routers' counters, which the ingress's /metrics reports.

Everything in it is bookkeeping: a few dict operations per call; see docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from radixserve.cluster.kv_events import STORED, EventBatch, KVEvent
from radixserve.cluster.prefix_index import PrefixIndex

STATE_ACTOR_NAME = "radixserve-cluster-state"


class ClusterStateImpl:
    """The actor's body (plain class, so it can be tested without Ray)."""

    def __init__(self, replica_ttl_s: float = 10.0, log_size: int = 4096, router_ttl_s: float = 30.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.replica_ttl_s = replica_ttl_s
        self.router_ttl_s = router_ttl_s  # a router (ingress) silent this long is gone: its counters go
        self.wall_clock = wall_clock  # named caches expire in wall-clock time
        self.index = PrefixIndex()
        self.log: deque[tuple[int, EventBatch]] = deque(maxlen=log_size)
        self.version = 0
        self.profile: Any = None
        self.caches: dict[str, Any] = {}
        self.router_stats: dict[str, tuple[float, dict[str, float]]] = {}  # router -> (reported at, counters)
        self.last_lag_s = 0.0
        self._changed: asyncio.Event | None = None  # set (and replaced) when the log grows
        self._logged_seq: dict[str, int] = {}  # per replica: the sequence number of its last logged batch
        # new at every (re)start: a replica that sees it change gives back what only it still
        # has (its routing profile, its named caches), which a restart lost
        self.incarnation = uuid.uuid4().hex

    async def wait_for_updates(self, cursor: int, timeout_s: float) -> tuple[int, list[EventBatch]]:
        """``updates(cursor)``, after waiting up to ``timeout_s`` for something new when there is
        nothing yet. (The actor is async for this one method; Ray runs the others on the same
        event loop, so no two calls ever interleave inside a method.)"""
        if cursor == self.version:
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.updates(cursor)

    def _log(self, batch: EventBatch) -> None:
        # Heartbeats are not logged, yet they use up the replica's sequence numbers: what the log
        # keeps is numbered again, so that a router's index sees consecutive batches (with the
        # replica's numbers it found a gap after every idle second, and reloaded every snapshot).
        seq = self._logged_seq[batch.replica_id] = self._logged_seq.get(batch.replica_id, 0) + 1
        self.version += 1
        self.log.append((self.version, dataclasses.replace(batch, seq=seq)))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # ---- KV events ------------------------------------------------------------------------
    def publish(self, batch: EventBatch) -> str | None:
        """Apply a replica's batch: this actor's incarnation, or None to ask for a snapshot (the
        actor missed batches, or restarted and knows nothing of it)."""
        self._expire()
        if not self.index.apply(batch):
            return None
        if batch.sent_at:
            self.last_lag_s = max(0.0, time.time() - batch.sent_at)
        if batch.events or batch.snapshot:
            self._log(batch)
        return self.incarnation

    def updates(self, cursor: int) -> tuple[int, list[EventBatch]]:
        """Batches after ``cursor`` (what a router saw last), or, for a new or lagging router,
        one snapshot batch per live replica. Dropped replicas come as empty snapshots."""
        self._expire()
        if cursor == self.version:
            return cursor, []
        if self.log and cursor >= self.log[0][0] - 1 and cursor <= self.version:
            return self.version, [b for v, b in self.log if v > cursor]
        return self.version, self._snapshot()

    def live_replicas(self) -> list[str]:
        self._expire()
        return sorted(self.index.replicas)

    def drop_replica(self, replica_id: str) -> None:
        if replica_id in self.index.replicas:
            self.index.drop_replica(replica_id)
            self._log_drop(replica_id)

    def _expire(self) -> None:
        for replica_id in self.index.drop_stale(self.replica_ttl_s):
            self._log_drop(replica_id)

    def _log_drop(self, replica_id: str) -> None:
        self._log(EventBatch(replica_id, 0, [], snapshot=True))
        del self._logged_seq[replica_id]  # its next logged batch is a snapshot (the index refuses any other)

    def _snapshot(self) -> list[EventBatch]:
        batches = []
        for replica_id, holdings in self.index.replicas.items():
            # namespaces do not matter to the index (they are inside the keys)
            seq = self._logged_seq.get(replica_id, 0)  # the log's numbering, which the router follows next
            batches.append(EventBatch(replica_id, seq, [KVEvent(STORED, "", list(holdings.keys))], True))
        return batches

    # ---- routing profile -------------------------------------------------------------------
    def set_profile(self, profile: Any) -> None:
        self.profile = profile

    def get_profile(self) -> Any:
        return self.profile

    # ---- named caches ------------------------------------------------------------------------
    def put_cache(self, cache: Any) -> None:
        self._drop_expired_caches()
        self.caches[cache.cache_id] = cache

    def _drop_expired_caches(self) -> None:
        """A cache whose replicas all died before it expired is dropped by nobody else."""
        now = self.wall_clock()
        for cache_id in [i for i, c in self.caches.items() if c.expire_time <= now]:
            del self.caches[cache_id]

    def get_cache(self, cache_id: str) -> Any:
        return self.caches.get(cache_id)

    def restore_caches(self, caches: list[Any]) -> None:
        """A replica's named caches, given back after this actor restarted; where two replicas
        hold one, the later update (a TTL changed through one of them) wins."""
        for cache in caches:
            held = self.caches.get(cache.cache_id)
            if held is None or cache.update_time > held.update_time:
                self.caches[cache.cache_id] = cache

    def delete_cache(self, cache_id: str) -> None:
        self.caches.pop(cache_id, None)

    def list_caches(self, owner: str) -> list[Any]:
        return [c for c in self.caches.values() if c.owner == owner]

    # ---- metrics ----------------------------------------------------------------------------
    def report_router(self, router_id: str, stats: dict[str, float]) -> None:
        self._drop_silent_routers()
        self.router_stats[router_id] = (self.wall_clock(), stats)

    def _drop_silent_routers(self) -> None:
        oldest = self.wall_clock() - self.router_ttl_s
        for router_id in [r for r, (at, _) in self.router_stats.items() if at < oldest]:
            del self.router_stats[router_id]

    def stats(self) -> dict[str, Any]:
        self._expire()
        self._drop_expired_caches()
        self._drop_silent_routers()
        return {
            "replicas": {r: {"blocks": len(h.keys), "seq": h.seq, "unfinished_requests": h.num_running_tokens}
                         for r, h in self.index.replicas.items()},
            "index_keys": self.index.num_keys,
            "index_entries": self.index.num_entries,
            "event_lag_s": self.last_lag_s,
            "named_caches": len(self.caches),
            "routers": {router_id: stats for router_id, (_, stats) in self.router_stats.items()},
        }


ClusterState = ray.remote(num_cpus=0, max_restarts=-1)(ClusterStateImpl)


def get_or_create_state_actor(name: str = STATE_ACTOR_NAME, namespace: str | None = None) -> Any:
    """The application's ClusterState (created by whoever comes first; detached, so it outlives
    the replica or router that created it)."""
    return ClusterState.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached").remote()

"""CacheAwareRouter: a Ray Serve RequestRouter that sends a request to the replica holding the
longest prefix of its prompt, weighed against load (prefix_index.choose_replica).

It lives in the process that calls the engine deployment (the ingress), one per handle, on the
event loop that serves the ingress's HTTP (deployments.routing_handle): its event syncing shares
that loop, so it yields between batches (a snapshot of a big cache is still one step). A
background task pulls the replicas' KV events from ClusterState into a local PrefixIndex (a long
poll: each pull returns as soon as a batch lands, or after ``sync_wait_s`` with nothing), so
routing itself never waits on the network: it hashes nothing (the ingress sent the keys) and
does one set lookup per prompt block per candidate.

Load is this router's own count of requests in flight per replica (routed, not yet completed):
exact for what it sent, and it needs no probe. Ray's queue-length probes still guard against a
full replica (a chosen replica that refuses is retried with the next rank).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from typing import Any

import ray
from ray.serve._private.common import ReplicaID
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import LocalityMixin, MultiplexMixin, RequestRouter

from radixserve.cluster.prefix_index import PREFIX, PrefixIndex, choose_replica
from radixserve.cluster.routing_hint import RoutedRequest
from radixserve.cluster.shared_state import STATE_ACTOR_NAME

log = logging.getLogger("radixserve.cluster")
REPORT_INTERVAL_S = 0.25  # the least time between two reports of the counters, when they change


class CacheAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(
        self,
        balance: float = 0.25,
        sync_wait_s: float = 1.0,
        min_sync_interval_s: float = 0.02,
        tentative_ttl_s: float = 10.0,
        state_actor_name: str = STATE_ACTOR_NAME,
        state_actor_namespace: str | None = None,
        first_sync_timeout_s: float = 2.0,
    ) -> None:
        """balance: how much one extra in-flight request costs against the fraction of the
        prompt a replica would reuse (docs/scaling.md); sync_wait_s: how long one pull of KV
        events waits for a new batch (an idle router asks this often: polling every 50 ms was
        CPU that replicas on a small box share); min_sync_interval_s:
        the least time between pulls (many replicas' batches then come in one); tentative_ttl_s: how long a routed prompt counts as held before its events come;
        first_sync_timeout_s: how long a new (or restarted) router waits for its first snapshot
        of the replicas' blocks before it routes blind."""
        self.balance = balance
        self.sync_wait_s = sync_wait_s
        self.min_sync_interval_s = min_sync_interval_s
        self.index = PrefixIndex(tentative_ttl=tentative_ttl_s)
        self.in_flight: dict[str, int] = {}
        # (request id, replica) of each attempt in flight: a request a replica refused is retried
        # under the same id, and the refused attempt's completion may come after the retry's routing
        self._attempts_in_flight: set[tuple[str, str]] = set()
        self._state_actor_name = state_actor_name
        self._state_actor_namespace = state_actor_namespace
        self._state_actor: Any = None
        self._cursor = -1
        self._sync_task: asyncio.Task | None = None
        self._first_sync_timeout_s = first_sync_timeout_s
        self._synced = asyncio.Event()  # set after the first successful pull
        self._router_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._rng = random.Random()
        self._last_report = 0.0  # when the counters last went to ClusterState (/metrics)
        self._report_pending = False
        self.stats = {"decisions_prefix": 0, "decisions_balance": 0, "decisions_targeted": 0,
                      "routing_seconds_total": 0.0, "event_lag_seconds": 0.0, "index_keys": 0,
                      "index_entries": 0, "syncs": 0}

    # ---- routing ------------------------------------------------------------------------
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self._ensure_sync_task()
        if not candidate_replicas:
            return []
        await self._wait_for_first_sync()
        started = time.perf_counter()
        request = _routed_request(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if request is not None and request.target_replica is not None:
            target = by_id.get(request.target_replica)
            self.stats["decisions_targeted"] += 1
            # a replica that is gone: any replica answers 404 at once (an empty rank would make
            # Ray retry forever)
            return [[target]] if target is not None else [list(by_id.values())]
        keys = request.keys if request is not None else []
        matched = self.index.matched_blocks(keys, by_id) if keys else {}
        held = {r: self.index.num_blocks_held(r) for r in by_id}
        choice = choose_replica(list(by_id), matched, self.in_flight, len(keys), self.balance, self._rng, held)
        if keys:
            self.index.note_routed(choice.replica_id, keys)
        self.stats["decisions_prefix" if choice.decision == PREFIX else "decisions_balance"] += 1
        self.stats["routing_seconds_total"] += time.perf_counter() - started
        self._report_soon()
        rest = [r for rid, r in by_id.items() if rid != choice.replica_id]
        rest.sort(key=lambda r: self.in_flight.get(r.replica_id.unique_id, 0))
        return [[by_id[choice.replica_id]], rest] if rest else [[by_id[choice.replica_id]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = replica_id.unique_id
        self.in_flight[rid] = self.in_flight.get(rid, 0) + 1
        self._attempts_in_flight.add((pending_request.metadata.internal_request_id, rid))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.unique_id
        attempt = (internal_request_id, rid)
        if attempt in self._attempts_in_flight:
            self._attempts_in_flight.discard(attempt)
            self.in_flight[rid] = max(0, self.in_flight.get(rid, 0) - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        rid = replica_id.unique_id
        self.index.drop_replica(rid)
        self.in_flight.pop(rid, None)
        self._attempts_in_flight = {a for a in self._attempts_in_flight if a[1] != rid}

    # ---- KV events ----------------------------------------------------------------------
    async def _wait_for_first_sync(self) -> None:
        """A router that just started (e.g. its ingress restarted) knows no replica's blocks yet:
        routing before the first snapshot would send a prefix away from the replica that holds it."""
        if self._synced.is_set():
            return
        try:
            await asyncio.wait_for(self._synced.wait(), timeout=self._first_sync_timeout_s)
        except asyncio.TimeoutError:
            log.warning("no KV-event snapshot after %.1f s; routing on load alone until one comes",
                        self._first_sync_timeout_s)
            self._synced.set()  # warn once; the sync task keeps trying

    def _ensure_sync_task(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
                if time.monotonic() - self._last_report > 1.0:
                    self._report()
            except Exception:  # noqa: BLE001 - the state actor restarts; keep routing on what we know
                log.warning("pulling KV events failed; retrying", exc_info=True)
                self._state_actor = None
                await asyncio.sleep(1.0)
            await asyncio.sleep(self.min_sync_interval_s)

    def _report_soon(self) -> None:
        """The counters to ClusterState now, or a quarter second after the last report: /metrics
        shows a routing decision by the time its response is out, at most 4 reports a second."""
        if self._report_pending:
            return
        self._report_pending = True
        delay = max(0.0, self._last_report + REPORT_INTERVAL_S - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._report)

    def _report(self) -> None:
        self._report_pending = False
        self._last_report = time.monotonic()
        try:
            self._state().report_router.remote(self._router_id, dict(self.stats))
        except Exception:  # noqa: BLE001 - the state actor restarts: the next report carries the counts
            self._state_actor = None

    async def sync_once(self) -> None:
        """Apply the KV events published since the last pull (a snapshot the first time), waiting
        up to sync_wait_s for some when there are none yet."""
        cursor, batches = await self._state().wait_for_updates.remote(self._cursor, self.sync_wait_s)
        now = time.time()
        for batch in batches:
            if not self.index.apply(batch):
                # a gap (the actor's log moved past us): start over from a snapshot next time
                cursor = -1
                break
            if batch.sent_at:
                self.stats["event_lag_seconds"] = max(0.0, now - batch.sent_at)
            await asyncio.sleep(0)  # this loop also serves HTTP (routing_handle): let requests through between batches
        self._cursor = cursor
        # a replica Ray no longer lists (dead or scaled down) keeps no entries here
        live = {r.unique_id for r in self._replica_id_set}
        if live:
            for replica_id in [r for r in self.index.replicas if r not in live]:
                self.index.drop_replica(replica_id)
        self.index.prune_tentative()
        self.stats["index_keys"] = self.index.num_keys
        self.stats["index_entries"] = self.index.num_entries
        self.stats["syncs"] += 1
        self._synced.set()

    def _state(self) -> Any:
        if self._state_actor is None:
            self._state_actor = ray.get_actor(self._state_actor_name, namespace=self._state_actor_namespace)
        return self._state_actor


def _routed_request(pending_request: PendingRequest | None) -> RoutedRequest | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, RoutedRequest):
            return arg
    return None

"""The global prefix index and the routing score (plain Python: no Ray, unit-tested alone).

``PrefixIndex`` knows which replica holds which block, by content key, from the replicas' KV
events (kv_events.py). The router computes the content keys of a request's prompt (same model
identity, block size and tenant namespace, so ``cache_salt`` and per-key isolation are part of
the key and never cross) and asks how many leading blocks each replica holds.

Between routing a request and that replica's events arriving (a prefill takes a while), more
requests with the same new prefix may come: the router notes the routed prompt's keys as
*tentative* holdings of the chosen replica for ``tentative_ttl`` seconds (SGLang's router and
Ray's PrefixCacheAffinityRouter do the same with prompt text), so they follow the first one.
Events then confirm them, or the ttl drops them.

``choose_replica`` is the score: the fraction of the prompt a replica would reuse, minus
``balance`` times how many more requests it has in flight than the least loaded candidate.
``balance`` = 0 routes on cache hits alone; 0.25 (the default) gives up a fully cached
replica once it has four requests more than another; a large value is plain least-loaded.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from radixserve.cache.block_keys import BlockKey
from radixserve.cluster.kv_events import REMOVED, STORED, EventBatch

PREFIX = "prefix"  # routed to the replica holding the longest prefix
BALANCE = "balance"  # no useful prefix anywhere (or it was outweighed by load): least loaded


@dataclass(slots=True)
class ReplicaHoldings:
    keys: set[BlockKey] = field(default_factory=set)
    seq: int = 0  # last batch applied
    last_update: float = 0.0  # clock time of that batch
    num_running_tokens: int = 0
    tentative: dict[BlockKey, float] = field(default_factory=dict)  # key -> expiry (clock time)


class PrefixIndex:
    """Which replica holds which block (by content key). Not thread-safe: one owner (the router's
    event loop, or the shared-state actor)."""

    def __init__(self, tentative_ttl: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.tentative_ttl = tentative_ttl
        self.clock = clock
        self.replicas: dict[str, ReplicaHoldings] = {}
        self._holders: dict[BlockKey, set[str]] = {}
        # (expiry, replica, keys) in routing order, so in expiry order: pruning pops what is due
        # instead of scanning every tentative key at every sync (the router's loop serves HTTP)
        self._tentative_due: deque[tuple[float, str, Sequence[BlockKey]]] = deque()

    # ---- updates ------------------------------------------------------------------------
    def apply(self, batch: EventBatch) -> bool:
        """Apply one replica's batch. False (nothing applied) when batches were missed: the
        caller asks that replica for a snapshot."""
        holdings = self.replicas.get(batch.replica_id)
        if batch.snapshot:
            self.drop_replica(batch.replica_id)
            holdings = self.replicas[batch.replica_id] = ReplicaHoldings()
        elif holdings is None and batch.seq == 1:  # a replica's first batch
            holdings = self.replicas[batch.replica_id] = ReplicaHoldings()
        elif holdings is None or batch.seq != holdings.seq + 1:
            return False
        for event in batch.events:
            if event.kind == STORED:
                for key in event.keys:
                    if key not in holdings.keys:
                        holdings.keys.add(key)
                        self._holders.setdefault(key, set()).add(batch.replica_id)
                    holdings.tentative.pop(key, None)
            elif event.kind == REMOVED:
                for key in event.keys:
                    if key in holdings.keys:
                        holdings.keys.discard(key)
                        holders = self._holders[key]
                        holders.discard(batch.replica_id)
                        if not holders:
                            del self._holders[key]
                    holdings.tentative.pop(key, None)
        holdings.seq = batch.seq
        holdings.last_update = self.clock()
        holdings.num_running_tokens = batch.num_running_tokens
        return True

    def drop_replica(self, replica_id: str) -> None:
        """Forget everything a replica held (it died, restarted, or stopped reporting)."""
        holdings = self.replicas.pop(replica_id, None)
        if holdings is None:
            return
        for key in holdings.keys:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._holders[key]

    def drop_stale(self, max_age: float) -> list[str]:
        """Drop replicas whose last batch is older than ``max_age`` seconds; returns their ids."""
        cutoff = self.clock() - max_age
        stale = [r for r, h in self.replicas.items() if h.last_update < cutoff]
        for replica_id in stale:
            self.drop_replica(replica_id)
        return stale

    def note_routed(self, replica_id: str, keys: Sequence[BlockKey]) -> None:
        """The router sent a prompt with these keys to ``replica_id``: expect it to hold them."""
        holdings = self.replicas.get(replica_id)
        if holdings is None:  # routed before its first batch: events will start it (snapshot or seq 1)
            holdings = self.replicas[replica_id] = ReplicaHoldings(last_update=self.clock())
        expiry = self.clock() + self.tentative_ttl
        for key in keys:
            if key not in holdings.keys:
                holdings.tentative[key] = expiry
        self._tentative_due.append((expiry, replica_id, keys))

    # ---- reads --------------------------------------------------------------------------
    def matched_blocks(self, keys: Sequence[BlockKey], replica_ids: Iterable[str]) -> dict[str, int]:
        """For each replica, how many leading blocks of ``keys`` it holds (or is expected to)."""
        now = self.clock()
        result = {}
        for replica_id in replica_ids:
            holdings = self.replicas.get(replica_id)
            count = 0
            if holdings is not None:
                held, tentative = holdings.keys, holdings.tentative
                for key in keys:
                    if key in held or tentative.get(key, 0.0) > now:
                        count += 1
                    else:
                        break
            result[replica_id] = count
        return result

    def num_blocks_held(self, replica_id: str) -> int:
        """Blocks a replica holds or is expected to (its cache's fill, as this index sees it)."""
        holdings = self.replicas.get(replica_id)
        return len(holdings.keys) + len(holdings.tentative) if holdings is not None else 0

    @property
    def num_keys(self) -> int:
        """Distinct blocks indexed (the index size)."""
        return len(self._holders)

    @property
    def num_entries(self) -> int:
        """(block, replica) pairs indexed: a block two replicas hold counts twice."""
        return sum(len(h.keys) for h in self.replicas.values())

    def prune_tentative(self) -> None:
        """Drop expired tentative holdings: only the routings now due are visited."""
        now = self.clock()
        due = self._tentative_due
        while due and due[0][0] <= now:
            _, replica_id, keys = due.popleft()
            holdings = self.replicas.get(replica_id)
            if holdings is None:
                continue
            for key in keys:
                expiry = holdings.tentative.get(key)
                if expiry is not None and expiry <= now:  # a later routing of the same key renewed it
                    del holdings.tentative[key]


@dataclass(slots=True)
class RoutingChoice:
    replica_id: str
    decision: str  # PREFIX or BALANCE
    matched_blocks: int  # blocks of the prompt the chosen replica holds


def choose_replica(
    candidates: Sequence[str],
    matched_blocks: dict[str, int],
    in_flight: dict[str, int],
    num_prompt_blocks: int,
    balance: float,
    rng: random.Random | None = None,
    blocks_held: dict[str, int] | None = None,
) -> RoutingChoice:
    """The candidate with the best score = reused fraction - balance * (in flight - least in flight).
    Ties go to the less loaded, then to the one holding fewer blocks, then at random. A prefix no
    candidate holds goes to the one holding fewer blocks first (see below)."""
    if not candidates:
        raise ValueError("no candidate replicas")
    rng = rng or random
    least = min(in_flight.get(r, 0) for r in candidates)
    prompt_blocks = max(num_prompt_blocks, 1)

    def score(replica_id: str) -> float:
        reused = matched_blocks.get(replica_id, 0) / prompt_blocks
        return reused - balance * (in_flight.get(replica_id, 0) - least)

    order = list(candidates)
    rng.shuffle(order)
    held = blocks_held or {}
    if not any(matched_blocks.get(r, 0) for r in candidates):
        # A new prefix stays where it first goes (its next requests follow it there), so it goes
        # to the cache holding fewest blocks: the share each replica has taken over time, not
        # this instant's queues, which at a few requests in flight split 8 system prompts 3 / 5
        # (bench/bench_routing_sim.py). Only among the replicas the balance term would still
        # send a wholly cached prompt to: fewer than 1 / balance more in flight than the least.
        limit = least + 1 / balance if balance > 0 else math.inf
        eligible = [r for r in order if in_flight.get(r, 0) < limit]
        best = min(eligible, key=lambda r: (held.get(r, 0), in_flight.get(r, 0)))
        return RoutingChoice(best, BALANCE, 0)
    best = max(order, key=lambda r: (score(r), -in_flight.get(r, 0), -held.get(r, 0)))
    matched = matched_blocks.get(best, 0)
    return RoutingChoice(best, PREFIX if matched > 0 else BALANCE, matched)

"""ClusterState's KV-event relay as a long poll (the plain class, on asyncio; no Ray): a waiting
router gets a batch as soon as a replica publishes it, and an idle one gets nothing after its
timeout. Plus the recorder's has_pending, which lets an idle replica skip publishing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from radixserve.cluster.kv_events import STORED, EventBatch, KVEvent
from radixserve.cluster.prefix_index import PrefixIndex
from radixserve.cluster.shared_state import ClusterStateImpl
from tests.cluster.test_kv_events import cache, make_tree


def batch(replica: str, seq: int, key: bytes) -> EventBatch:
    return EventBatch(replica, seq, [KVEvent(STORED, "", [key])])


def test_a_waiting_pull_returns_when_a_batch_lands_and_times_out_when_none_does():
    async def scenario() -> None:
        state = ClusterStateImpl()
        state.publish(batch("r1", 1, b"a" * 32))
        cursor, first = await state.wait_for_updates(-1, timeout_s=5.0)  # new router: at once
        assert [b.replica_id for b in first] == ["r1"] and cursor == state.version

        waiting = asyncio.create_task(state.wait_for_updates(cursor, timeout_s=30.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing new: it waits
        state.publish(batch("r1", 2, b"b" * 32))
        cursor, batches = await asyncio.wait_for(waiting, timeout=5.0)  # woken by the publish, not the 30 s
        assert [(b.seq, b.events[0].keys) for b in batches] == [(2, [b"b" * 32])]

        state.publish(EventBatch("r1", 3, []))  # a heartbeat: nothing for routers
        assert await state.wait_for_updates(cursor, timeout_s=0.05) == (cursor, [])

    asyncio.run(scenario())


def test_recorder_has_pending_only_until_drained():
    tree, recorder = make_tree()
    assert not recorder.has_pending
    cache(tree, list(range(8)))
    assert recorder.has_pending
    recorder.drain("r")
    assert not recorder.has_pending
    recorder.request_snapshot()
    assert recorder.has_pending  # a snapshot is owed


def test_a_router_follows_the_relay_across_heartbeats_without_a_snapshot():
    """Heartbeats are not logged but use up a replica's sequence numbers. The log numbers the
    batches it keeps, so a router's index sees no gap. Before, the first batch after any idle
    second was refused, and the router reloaded every replica's snapshot: a full reload each time,
    and its tentative holdings (the prefixes it had just routed) lost."""
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    state = ClusterStateImpl()
    router = PrefixIndex()
    state.publish(EventBatch("r2", 1, []))  # a replica whose first batch is a heartbeat
    state.publish(batch("r1", 1, a))
    cursor, batches = state.updates(-1)
    assert all(router.apply(x) for x in batches)
    router.note_routed("r1", [a, c])  # routed, its prefill's events not in yet
    for seq in (2, 3):
        state.publish(EventBatch("r1", seq, []))  # idle seconds
    state.publish(batch("r1", 4, b))
    state.publish(batch("r2", 2, c))
    cursor, batches = state.updates(cursor)
    assert [x.snapshot for x in batches] == [False, False]
    assert all(router.apply(x) for x in batches)
    assert router.matched_blocks([a, c], ["r1", "r2"]) == {"r1": 2, "r2": 0}  # the tentative c kept
    assert router.matched_blocks([c], ["r2"]) == {"r2": 1}
    assert router.matched_blocks([b], ["r1"]) == {"r1": 1}


def test_expired_named_caches_and_silent_routers_are_dropped():
    """Nothing else removes a cache whose replicas died before it expired, or the counters of an
    ingress that restarted under a new id: the actor drops them itself."""
    now = [1000.0]
    state = ClusterStateImpl(router_ttl_s=30.0, wall_clock=lambda: now[0])
    state.put_cache(SimpleNamespace(cache_id="short", owner="o", expire_time=1060.0, update_time=1000.0))
    state.put_cache(SimpleNamespace(cache_id="long", owner="o", expire_time=5000.0, update_time=1000.0))
    state.report_router("old-ingress", {"decisions_prefix": 5})
    now[0] = 1100.0
    state.report_router("new-ingress", {"decisions_prefix": 1})
    stats = state.stats()
    assert stats["named_caches"] == 1 and [c.cache_id for c in state.list_caches("o")] == ["long"]
    assert stats["routers"] == {"new-ingress": {"decisions_prefix": 1}}

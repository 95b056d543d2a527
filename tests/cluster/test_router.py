"""CacheAwareRouter's own count of requests in flight, fed the calls Ray Serve makes (the router
object is real; only Ray's request and replica ids are built by hand, no cluster)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402

from radixserve.cluster.router import CacheAwareRouter  # noqa: E402


def test_in_flight_counts_follow_each_attempt_of_a_retried_request():
    router = CacheAwareRouter.__new__(CacheAwareRouter)
    router.initialize_state()
    deployment = DeploymentID(name="Engine", app_name="radixserve")
    a, b = ReplicaID("a", deployment), ReplicaID("b", deployment)
    request = SimpleNamespace(metadata=SimpleNamespace(internal_request_id="req-1"))
    router.on_request_routed(request, a, None)
    router.on_request_routed(request, b, None)  # a refused it: Ray retried it on b, same id
    router.on_request_completed(a, "req-1")  # a's attempt ends after the retry began
    assert router.in_flight == {"a": 0, "b": 1}
    router.on_request_completed(b, "req-1")
    assert router.in_flight == {"a": 0, "b": 0}
    router.on_request_completed(b, "req-1")  # told twice: counted once
    assert router.in_flight == {"a": 0, "b": 0}

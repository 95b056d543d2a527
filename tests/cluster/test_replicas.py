"""Two engine replicas of the embedded model on a real local Ray Serve, behind the cache-aware router.

One module-scoped cluster (Ray with 2 CPUs, replicas of 0.5 CPU); the official openai client
talks to the routed endpoint. Slow: Ray and two model loads take about a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from radixserve.cluster.config import ClusterConfig  # noqa: E402
from radixserve.cluster.deployments import REPLICA_HEADER, build_app  # noqa: E402
from radixserve.cluster.routing_hint import RoutedRequest  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.server.config import ServerConfig  # noqa: E402
from tests.live_server import free_port  # noqa: E402
from tests.local_ray import start_local_ray  # noqa: E402

pytestmark = pytest.mark.slow

APP = "radixserve"
SYSTEM = "You are a terse assistant for the radixserve test suite. Answer in one short sentence. " * 4


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    start_local_ray("radixserve-test")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = EngineConfig(model=ModelConfig(source="embedded", show_progress=False), cache=CacheConfig(num_blocks=512))
    app = build_app(engine, ServerConfig(min_cacheable_tokens=16), ClusterConfig(replicas=2, replica_cpus=0.5))
    serve.run(app, name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(base: str, question: str, system: str = SYSTEM, **extra):
    response = client(base).chat.completions.with_raw_response.create(
        model="embedded", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=4, temperature=0, **extra)
    return response.headers.get(REPLICA_HEADER), response.parse()


def replica_ids() -> list[str]:
    return sorted(r.replica_id.unique_id for r in serve.status().applications[APP].deployments["Engine"].replicas) \
        if hasattr(serve.status().applications[APP].deployments["Engine"], "replicas") else []


def engine_handle():
    return serve.get_deployment_handle("Engine", app_name=APP).options(stream=True)


def call_replica(replica_id: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request to one named replica, through the router (its target_replica hint)."""
    import asyncio

    async def go():
        request = RoutedRequest(method, path, b"", [(b"content-type", b"application/json")], body, prompt=path,
                                target_replica=replica_id)
        stream = engine_handle().handle.remote(request)
        start = await stream.__anext__()
        return start["status"], start["body"] + b"".join([chunk async for chunk in stream])

    return asyncio.run(go())


def test_openai_client_plain_and_streaming(cluster):
    replica, out = chat(cluster, "Say hi.")
    assert replica and out.choices[0].message.content and out.usage.completion_tokens == 4
    stream = client(cluster).chat.completions.create(
        model="embedded", messages=[{"role": "user", "content": "Count to five."}], max_tokens=6, temperature=0,
        stream=True)
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # several chunks, not one buffered body
    assert "".join(deltas) == client(cluster).chat.completions.create(
        model="embedded", messages=[{"role": "user", "content": "Count to five."}], max_tokens=6,
        temperature=0).choices[0].message.content


def test_requests_sharing_a_prefix_land_on_the_replica_that_holds_it(cluster):
    systems = [f"Tenant {n} system prompt: " + SYSTEM for n in range(4)]
    first = {}
    for n, system in enumerate(systems):
        first[n], _ = chat(cluster, "First question?", system=system)
    time.sleep(0.5)  # the KV events of those prefills reach the router
    for n, system in enumerate(systems):
        for q in range(2):
            replica, out = chat(cluster, f"Question {q}?", system=system)
            assert replica == first[n]
            assert out.usage.prompt_tokens_details.cached_tokens >= 64
    assert len(set(first.values())) == 2  # four new prefixes on two idle replicas: both got some
    # cache_salt is part of the key: the same prompt under a new salt is a new prefix (no reuse)
    _, salted = chat(cluster, "First question?", system=systems[0], extra_body={"cache_salt": "s1"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    # the router reports its counters to the state actor at most 4 times a second: the last
    # decisions can reach /metrics a moment after their responses
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{cluster}/metrics", timeout=60).text
        assert 'radixserve_router_decisions_total{decision="prefix"}' in metrics
        prefix_decisions = float(metrics.split('radixserve_router_decisions_total{decision="prefix"} ')[1].split()[0])
        if prefix_decisions >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert prefix_decisions >= 8
    assert "radixserve_router_index_blocks" in metrics and f'replica="{first[0]}"' in metrics


def test_named_cache_created_through_the_endpoint_works_on_both_replicas(cluster):
    created = httpx.post(f"{cluster}/v1/caches", json={
        "model": "embedded", "system": "Named cache: " + SYSTEM, "ttl": "600s"}, timeout=120)
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    live = ray.get(ray.get_actor("radixserve-cluster-state").live_replicas.remote())
    assert len(live) == 2
    body = ('{"model": "embedded", "max_tokens": 2, "temperature": 0, "cached_content": "%s", '
            '"messages": [{"role": "user", "content": "Hi?"}]}' % name).encode()
    for replica_id in live:
        status, data = call_replica(replica_id, "POST", "/v1/chat/completions", body)
        assert status == 200, data
    listed = httpx.get(f"{cluster}/v1/caches", timeout=30).json()["cached_contents"]
    assert [c["name"] for c in listed] == [name]
    assert httpx.delete(f"{cluster}/v1/caches/{name.removeprefix('caches/')}", timeout=30).status_code == 200
    for replica_id in live:  # deleted through one replica: gone on every replica
        status, _ = call_replica(replica_id, "POST", "/v1/chat/completions", body)
        assert status == 404


def test_named_caches_survive_a_restart_of_the_cluster_state(cluster):
    created = httpx.post(f"{cluster}/v1/caches", json={
        "model": "embedded", "system": "Survivor cache: " + SYSTEM, "ttl": "600s"}, timeout=120)
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    state = ray.get_actor("radixserve-cluster-state")
    live = ray.get(state.live_replicas.remote())
    ray.kill(state, no_restart=False)  # Ray restarts it, empty
    # the replicas' next publishes meet a new incarnation and give their caches back
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            listed = httpx.get(f"{cluster}/v1/caches", timeout=30).json()["cached_contents"]
            if [c["name"] for c in listed] == [name]:
                break
        assert time.monotonic() < deadline, "the named cache never came back"
        time.sleep(0.5)
    body = ('{"model": "embedded", "max_tokens": 2, "temperature": 0, "cached_content": "%s", '
            '"messages": [{"role": "user", "content": "Hi?"}]}' % name).encode()
    for replica_id in live:
        status, data = call_replica(replica_id, "POST", "/v1/chat/completions", body)
        assert status == 200, data
    assert httpx.delete(f"{cluster}/v1/caches/{name.removeprefix('caches/')}", timeout=30).status_code == 200


def test_killed_replica_gives_a_clean_error_then_recovers(cluster):
    replica, _ = chat(cluster, "Warm up.", system="Kill test: " + SYSTEM)
    victim = ray.get_actor(f"SERVE_REPLICA::{APP}#Engine#{replica}", namespace="serve")
    started = time.monotonic()
    with httpx.stream("POST", f"{cluster}/v1/chat/completions", timeout=120, json={
            "model": "embedded", "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True,
            "messages": [{"role": "system", "content": "Kill test: " + SYSTEM}, {"role": "user", "content": "Go."}]}) as r:
        assert r.headers[REPLICA_HEADER] == replica  # the prefix holder got it
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        ray.kill(victim, no_restart=False)
        rest = list(lines)
    assert time.monotonic() - started < 60  # ended, not hung
    assert any("error" in line for line in rest) and not any("[DONE]" in line for line in rest)
    deadline = time.monotonic() + 120
    while True:  # Ray restarts the replica; meanwhile the survivor serves (or a clean 503)
        try:
            survivor, out = chat(cluster, "After the kill?", system="Kill test: " + SYSTEM)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503
            assert time.monotonic() < deadline
            time.sleep(1)
    assert survivor != replica and out.choices[0].message.content
    while len(ray.get(ray.get_actor("radixserve-cluster-state").live_replicas.remote())) != 2 or \
            replica in ray.get(ray.get_actor("radixserve-cluster-state").live_replicas.remote()):
        assert time.monotonic() < deadline, "the replica was not restarted"
        time.sleep(1)


def test_router_restart_loses_no_named_cache(cluster):
    created = httpx.post(f"{cluster}/v1/caches", json={
        "model": "embedded", "system": "Restart survivor: " + SYSTEM, "ttl": "600s"}, timeout=120)
    assert created.status_code == 200, created.text
    name = created.json()["name"]
    ingress = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{APP}#Ingress#")]
    assert len(ingress) == 1
    ray.kill(ray.get_actor(ingress[0]["name"], namespace=ingress[0]["namespace"]), no_restart=False)
    deadline = time.monotonic() + 120
    while True:  # the ingress (and its router, with an empty index) comes back
        try:
            response = client(cluster).chat.completions.with_raw_response.create(
                model="embedded", messages=[{"role": "user", "content": "Still there?"}], max_tokens=2,
                extra_body={"cached_content": name})
            break
        except (openai.APIConnectionError, openai.APIStatusError):
            assert time.monotonic() < deadline, "the ingress did not come back"
            time.sleep(1)
    out = response.parse()
    assert out.usage.prompt_tokens_details.cached_tokens >= 32  # served from the named cache's blocks

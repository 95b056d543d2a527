"""The in-process HTTP ingress (`radixserve serve --replicas`): no Serve proxy, no ingress
actor; this process serves HTTP and calls the engine deployment through our router. Real Ray,
one replica of the embedded model, the official openai client."""

from __future__ import annotations

import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from radixserve.cluster.config import ClusterConfig  # noqa: E402
from radixserve.cluster.deployments import REPLICA_HEADER, build_engine_app, http_ingress_app  # noqa: E402
from radixserve.cluster.shared_state import STATE_ACTOR_NAME  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.server.config import ServerConfig  # noqa: E402
from tests.local_ray import start_local_ray  # noqa: E402
from tests.live_server import free_port, serve_app  # noqa: E402

pytestmark = pytest.mark.slow
SYSTEM = "You are the in-process ingress test assistant. Answer in one short sentence. " * 4


def test_openai_client_through_the_in_process_ingress():
    start_local_ray("radixserve-test-http-ingress")
    try:
        serve.start(proxy_location="Disabled")
        config = ServerConfig(min_cacheable_tokens=16)
        engine = serve.run(build_engine_app(
            EngineConfig(model=ModelConfig(source="embedded", show_progress=False), cache=CacheConfig(num_blocks=256)),
            config, ClusterConfig(replicas=1)), name="radixserve", route_prefix=None)
        with serve_app(http_ingress_app(engine, config)) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hi."}]
            first = client.chat.completions.with_raw_response.create(model="embedded", messages=messages,
                                                                     max_tokens=3, temperature=0)
            assert first.headers.get(REPLICA_HEADER)
            assert first.parse().usage.completion_tokens == 3
            time.sleep(0.5)  # the prefill's KV events reach the router
            again = client.chat.completions.create(model="embedded", messages=messages, max_tokens=3, temperature=0)
            assert again.usage.prompt_tokens_details.cached_tokens >= 64
            assert again.choices[0].message.content == first.parse().choices[0].message.content
            stream = client.chat.completions.create(model="embedded", messages=messages, max_tokens=4,
                                                    temperature=0, stream=True)
            deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
            assert len(deltas) >= 2
            bad = httpx.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": messages}, timeout=60)
            assert bad.status_code == 404 and "model" in bad.text  # the replica's own error, passed through
            metrics = httpx.get(f"{base}/metrics", timeout=60).text
            assert 'radixserve_router_decisions_total{decision="prefix"}' in metrics

            # a client that hangs up on a non-streamed request: the replica aborts it (the answer
            # comes whole at the end, so nothing else would stop it before max_tokens)
            aborted = aborted_requests(base)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", json={"model": "embedded", "prompt": "Tell a long story.",
                                                           "max_tokens": 2000, "ignore_eos": True}, timeout=1.0)
            deadline = time.monotonic() + 15  # 2000 tokens take about a minute here
            while aborted_requests(base) < aborted + 1:
                assert time.monotonic() < deadline, "the request ran on after its client left"
                time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


def aborted_requests(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics", timeout=60).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("radixserve_requests_aborted_total{"))


@pytest.mark.parametrize("router", ["pow2", "prefix-affinity"])
def test_metrics_reach_every_replica_under_rays_router(router):
    """/metrics fans out to each replica by id; Ray's routers cannot be told which, so the wrong
    replica answers first (pow2: half the time; prefix-affinity: always, were the text the same):
    every page must still carry both replicas."""
    start_local_ray("radixserve-test-metrics-pow2")
    try:
        serve.start(proxy_location="Disabled")
        config = ServerConfig()
        engine = serve.run(build_engine_app(
            EngineConfig(model=ModelConfig(source="dummy:tiny", show_progress=False), cache=CacheConfig(num_blocks=64)),
            config, ClusterConfig(replicas=2, router=router, replica_cpus=0.5)),
            name="radixserve", route_prefix=None)
        state = ray.get_actor(STATE_ACTOR_NAME)
        deadline = time.monotonic() + 60
        while len(ray.get(state.live_replicas.remote())) < 2:  # each replica's first heartbeat
            assert time.monotonic() < deadline, "the replicas never published"
            time.sleep(0.2)
        replica_ids = ray.get(state.live_replicas.remote())
        with serve_app(http_ingress_app(engine, config)) as base:
            for _ in range(4):
                metrics = httpx.get(f"{base}/metrics", timeout=60).text
                for replica_id in replica_ids:
                    assert f'replica="{replica_id}"' in metrics
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_replicas_command_serves_http_itself_and_stops_cleanly(tmp_path):
    """`radixserve serve --replicas 1` end to end: its own Ray, the engine deployment, HTTP from
    the launching process; SIGTERM stops all of it."""
    import signal
    import subprocess
    import sys

    from tests.live_server import wait_until_healthy

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "radixserve", "serve", "--model", "embedded", "--replicas", "1",
                                 "--replica-cpus", "1", "--ray-num-cpus", "2", "--host", "127.0.0.1", "--port",
                                 str(port), "--num-blocks", "128"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, proc, log_path.read_text)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        response = client.completions.with_raw_response.create(model="embedded", prompt="Hello", max_tokens=2)
        assert response.headers.get(REPLICA_HEADER) and response.parse().usage.completion_tokens == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    # uvicorn re-raises the SIGTERM it caught once it has shut down, and Ray's handler in the
    # driver turns that into exit status 15 (after the finally that stops Serve and Ray)
    assert returncode in (0, signal.SIGTERM, -signal.SIGTERM), log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()
    # one access line per request, from the ingress (as the plain server logs it), none from Serve's replica
    assert '"POST /v1/completions HTTP/1.1" 200' in log_path.read_text()
    assert "CALL handle" not in log_path.read_text()

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

from radixserve.cluster.deployments import REPLICA_HEADER, build_engine_app, http_ingress_app  # noqa: E402
from radixserve.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from radixserve.server.config import ServerConfig  # noqa: E402
from tests.live_server import serve_app  # noqa: E402

pytestmark = pytest.mark.slow
SYSTEM = "You are the in-process ingress test assistant. Answer in one short sentence. " * 4


def test_openai_client_through_the_in_process_ingress():
    ray.init(num_cpus=2, namespace="radixserve-test-http-ingress", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        config = ServerConfig(min_cacheable_tokens=16)
        engine = serve.run(build_engine_app(
            EngineConfig(model=ModelConfig(source="embedded", show_progress=False), cache=CacheConfig(num_blocks=256)),
            config, num_replicas=1, replica_resources={"num_cpus": 1}), name="radixserve", route_prefix=None)
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
    finally:
        serve.shutdown()
        ray.shutdown()

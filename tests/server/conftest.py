"""Fixtures: real radixserve servers (uvicorn on a free loopback port) over the embedded model.

The model is loaded once per session (tests/conftest.py's embedded_model); each server gets its
own LLMEngine (own KV pool and prefix cache) over it. `server` is shared by most tests; tests
that need special settings (API keys, a tiny pool, short TTLs) start their own with
`start_server`.

RADIXSERVE_TEST_ENGINE_PROCESS=1 runs every such server with its engine core in a process of
its own (--engine-process on; that process loads the model itself): the suite then checks the
process split. `server.engine` is then a CoreView, which asks the core through named calls.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from radixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from radixserve.server import ServerConfig, create_app
from tests.live_server import serve_app

# Long enough to span several 16-token blocks, short enough to prefill fast on CPU.
LONG_SYSTEM = (
    "You are the concierge of the Hotel Aurora in Lisbon. Guests ask about breakfast hours (7 to 11), "
    "the rooftop pool (open May to October), late checkout (until 14:00 for 20 euros), airport "
    "transfers (book a day ahead) and nearby sights such as Belem Tower and the Alfama district. "
    "Answer in at most two sentences, be warm, and never promise anything the hotel does not offer. "
) * 2
# A few blocks' worth, for tests that only need "some cached tokens".
SHORT_SYSTEM = LONG_SYSTEM[: len(LONG_SYSTEM) // 4]


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    app: object
    api_key: str | None = None

    @property
    def state(self):
        return self.app.state.radixserve

    @property
    def engine(self):
        return self.state.engine if self.state.engine is not None else CoreView(self.state)

    @property
    def tokenizer(self):
        return self.state.tokenizer

    def openai(self, api_key: str | None = None, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or self.api_key or "none",
                             max_retries=0, timeout=60, **kw)

    def async_openai(self, api_key: str | None = None, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or self.api_key or "none",
                                  max_retries=0, timeout=120, **kw)

    def anthropic(self, api_key: str | None = None, **kw):
        import anthropic

        return anthropic.Anthropic(base_url=self.base_url, api_key=api_key or self.api_key or "none",
                                   max_retries=0, timeout=60, **kw)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {name: value} (unlabelled samples only)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels:
                    values[sample.name] = sample.value
        return values

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Wait until no request runs or waits; returns the metrics then."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["radixserve_num_requests_running"] == 0 and m["radixserve_num_requests_waiting"] == 0:
                return m
            assert time.monotonic() < deadline, f"server did not go idle: {m}"
            time.sleep(0.05)


class CoreView:
    """What tests read of `server.engine` when the engine runs in its own process: the fixed
    facts from EngineInfo, the rest through the client's named calls on the server's loop."""

    def __init__(self, state) -> None:
        self._state = state

    def __getattr__(self, name: str):
        return getattr(self._state.engine_info, name)

    def _ask(self, coroutine):
        loop = self._state.async_engine._loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    def pinned_blocks(self, cache_namespace: str | None = None) -> int:
        return self._ask(self._state.async_engine.pinned_blocks(cache_namespace))

    def pinned_paths(self):
        return self._ask(self._state.async_engine.pinned_paths())

    def check_cache_invariants(self) -> None:
        self._ask(self._state.async_engine.check_cache_invariants())


def engine_process_forced() -> bool:
    return os.environ.get("RADIXSERVE_TEST_ENGINE_PROCESS", "") not in ("", "0")


@contextmanager
def start_server(loaded_model, server_config: ServerConfig | None = None, *, num_blocks: int = 1024,
                 max_num_batched_tokens: int = 2048, api_key: str | None = None,
                 kv_store: str | None = None, engine_process: bool | None = None) -> Iterator[RunningServer]:
    """Run a server in a background thread on a free 127.0.0.1 port until the block exits.
    engine_process: its engine core in a process of its own (None: as RADIXSERVE_TEST_ENGINE_PROCESS says)."""
    import dataclasses

    from radixserve.engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(source="embedded", show_progress=False),
        cache=CacheConfig(num_blocks=num_blocks, kv_store=kv_store),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
    )
    server_config = server_config or ServerConfig(min_cacheable_tokens=32)
    if engine_process if engine_process is not None else engine_process_forced():
        app = create_app(config, dataclasses.replace(server_config, engine_process="on"))
    else:
        app = create_app(LLMEngine(config, loaded=loaded_model), server_config)
    with serve_app(app) as base_url:
        yield RunningServer(base_url, app, api_key)


@pytest.fixture(scope="session")
def server(embedded_model) -> Iterator[RunningServer]:
    """The shared server: roomy pool, no API keys, min_cacheable_tokens=32."""
    with start_server(embedded_model) as running:
        yield running

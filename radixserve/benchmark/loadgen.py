"""An async load generator for any OpenAI-compatible server.

It streams every request (`stream_options: {"include_usage": true}`) and measures, per request,
what a client sees: time to first token (TTFT: until the first chunk that carries text), time
per output token after it (TPOT), end-to-end latency, and the server's own usage numbers
(prompt, completion and cached prompt tokens: `usage.prompt_tokens_details.cached_tokens`).

Two arrival disciplines, as in vLLM's and SGLang's serving benchmarks:
- closed loop (`concurrency=C`): C clients, each sending its next request when the last one ends;
- open loop (`request_rate=R`): Poisson arrivals at R requests/s from a seeded generator
  (`inf`: all at once), whatever the server's pace.
Multi-turn sessions are honoured under both: a turn is sent only after the session's previous
turn finished, as a chat user would. A workload whose requests carry `send_at` (head-of-line)
brings its own timeline: each request is sent at that time, under either discipline.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from radixserve.benchmark.text import TextGenerator
from radixserve.benchmark.workloads import BenchRequest


@dataclass(slots=True)
class LoadConfig:
    """Where to send the requests and how.

    base_url: the server, with or without the trailing /v1 (http://127.0.0.1:8000).
    Exactly one of concurrency / request_rate; neither means closed loop with concurrency 1.
    extra_body: merged into every request body (e.g. {"cache_salt": ...}).
    """

    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int | None = None
    request_rate: float | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout: float = 900.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.request_rate is not None:
            raise ValueError("give either a concurrency or a request rate, not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request rate must be > 0 (inf: all at once), got {self.request_rate}")

    @property
    def api_base(self) -> str:
        """The URL the OpenAI paths hang off (ends in /v1)."""
        base = self.base_url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def discipline(self) -> str:
        if self.request_rate is not None:
            return f"open loop, Poisson {self.request_rate:g} req/s" if math.isfinite(self.request_rate) \
                else "open loop, all at once"
        return f"closed loop, concurrency {self.concurrency or 1}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(slots=True)
class RequestResult:
    """What one request measured. Times are seconds; `start` and `end` count from the run's start.
    cached_tokens is None when the server does not report it."""

    index: int
    group: str
    shared_prefix_tokens: int
    start: float
    end: float
    ttft: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int = 0
    session: str | None = None
    turn: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time between output tokens after the first (None with fewer than 2 tokens)."""
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


@dataclass(slots=True)
class LoadRun:
    """One pass of a workload against one server."""

    workload: str
    label: str  # e.g. "on" / "off", or the engine's name
    base_url: str
    model: str
    discipline: str
    started_at: float  # wall-clock epoch seconds
    duration: float  # first send to last finish, seconds
    results: list[RequestResult]

    @property
    def ok_results(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]


async def run_load(requests: Sequence[BenchRequest], config: LoadConfig, label: str = "") -> LoadRun:
    """Send the requests (in their order) and measure each; failures are recorded, not raised."""
    from tqdm.auto import tqdm

    sessions = {(r.session, r.turn) for r in requests if r.session is not None}
    finished: dict[tuple[str, int], asyncio.Event] = {key: asyncio.Event() for key in sessions}
    results: list[RequestResult] = []
    bar = tqdm(total=len(requests), desc=config.description or label or "requests", unit="req",
               disable=not config.progress, leave=True, dynamic_ncols=True)
    timeline = any(req.send_at is not None for req in requests)
    # a connection per client; on a timeline every request may be in flight at once
    connections = len(requests) if timeline else config.concurrency or len(requests)
    limits = httpx.Limits(max_connections=max(connections, 1), max_keepalive_connections=64)
    timeout = httpx.Timeout(config.timeout, connect=30.0)
    clock0 = time.perf_counter()
    started_at = time.time()

    async with httpx.AsyncClient(base_url=config.api_base, headers=config.headers(), limits=limits,
                                 timeout=timeout) as client:

        async def one(req: BenchRequest) -> None:
            if req.session is not None and (req.session, req.turn - 1) in finished:
                await finished[(req.session, req.turn - 1)].wait()
            try:
                result = await _send(client, req, config, clock0)
            finally:
                if req.session is not None:
                    finished[(req.session, req.turn)].set()
            results.append(result)
            bar.update(1)
            done = [r for r in results if r.ok and r.prompt_tokens]
            if done and all(r.cached_tokens is not None for r in done):
                hit = sum(r.cached_tokens or 0 for r in done) / sum(r.prompt_tokens or 0 for r in done)
                bar.set_postfix_str(f"hit {hit:.0%}", refresh=False)

        try:
            if timeline:  # the workload's own
                async def at(req: BenchRequest) -> None:
                    await asyncio.sleep(max(0.0, clock0 + (req.send_at or 0.0) - time.perf_counter()))
                    await one(req)

                await asyncio.gather(*(at(req) for req in requests))
            elif config.request_rate is not None:
                rng = random.Random(config.seed)
                tasks = []
                for req in requests:
                    tasks.append(asyncio.create_task(one(req)))
                    if math.isfinite(config.request_rate):
                        await asyncio.sleep(rng.expovariate(config.request_rate))
                await asyncio.gather(*tasks)
            else:
                queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
                for req in requests:
                    queue.put_nowait(req)

                async def client_loop() -> None:
                    # Requests leave the queue in order, so a session's earlier turn is always
                    # taken before its later one: waiting on it cannot deadlock.
                    while not queue.empty():
                        await one(queue.get_nowait())

                await asyncio.gather(*(client_loop() for _ in range(config.concurrency or 1)))
        finally:
            bar.close()

    results.sort(key=lambda r: r.index)
    first = min((r.start for r in results), default=0.0)
    last = max((r.end for r in results), default=0.0)
    return LoadRun(
        workload=requests[0].workload if requests else "", label=label, base_url=config.base_url,
        model=config.model, discipline=config.discipline, started_at=started_at, duration=last - first,
        results=results,
    )


def run_load_sync(requests: Sequence[BenchRequest], config: LoadConfig, label: str = "") -> LoadRun:
    """run_load from synchronous code (its own event loop)."""
    return asyncio.run(run_load(requests, config, label))


async def _send(client: httpx.AsyncClient, req: BenchRequest, config: LoadConfig, clock0: float) -> RequestResult:
    body = req.body(config.model, temperature=config.temperature, ignore_eos=config.ignore_eos,
                    extra=config.extra_body)
    path = "/chat/completions" if req.api == "chat" else "/completions"
    start = time.perf_counter()
    result = RequestResult(index=req.index, group=req.group, shared_prefix_tokens=req.shared_prefix_tokens,
                           start=start - clock0, end=start - clock0, session=req.session, turn=req.turn)
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise _RequestFailed(f"HTTP {response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise _RequestFailed(f"stream error: {json.dumps(event['error'])[:300]}")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = choice.get("text") if req.api == "completions" else delta.get("content")
                    if text:
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - start
                        chunks += 1
                if event.get("usage"):
                    usage = event["usage"]
    except Exception as e:  # noqa: BLE001 -- any failure is this request's result, never the run's end
        result.error = f"{type(e).__name__}: {e}" if not isinstance(e, _RequestFailed) else str(e)
    result.end = time.perf_counter() - clock0
    if usage is not None:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens") or chunks
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = details.get("cached_tokens")
    else:
        result.completion_tokens = chunks  # servers that ignore include_usage: one token per chunk
    if result.error is None and result.ttft is None:
        result.error = "no output text"
    return result


class _RequestFailed(Exception):
    pass


# ---- helpers for a run: discovery, calibration, warm-up, cache reset ---------------------
def served_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model id /v1/models lists."""
    config = LoadConfig(base_url=base_url, model="", api_key=api_key)
    response = httpx.get(f"{config.api_base}/models", headers=config.headers(), timeout=timeout)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def calibrate_token_scale(base_url: str, model: str, api_key: str | None = None, num_tokens: int = 200) -> float:
    """Tokens the server's tokenizer spends per token of text.py's estimate (1.0 for the
    embedded model): one /v1/completions request of synthetic text, read from usage. Rounded to
    two decimals so that small tokenizer quirks do not change the generated workloads."""
    config = LoadConfig(base_url=base_url, model=model, api_key=api_key)
    text = TextGenerator(random.Random("calibration")).text(num_tokens)
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0}
    response = httpx.post(f"{config.api_base}/completions", json=body, headers=config.headers(), timeout=600)
    response.raise_for_status()
    measured = response.json()["usage"]["prompt_tokens"]
    return round(measured / num_tokens, 2)


def warm_up(base_url: str, model: str, api_key: str | None = None, num_tokens: int = 256, num_requests: int = 4,
            concurrency: int = 2, ignore_eos: bool = True) -> None:
    """Send a few short requests of unrelated text (first-call costs: allocator, kernels,
    thread pools), so that the timed run does not pay them. With more than two requests, two
    texts take turns, so the later requests go through the cached-prefix path too (on a GPU its
    kernels compile on first use)."""
    gen = TextGenerator(random.Random("warm-up"))
    texts = [f"Warm-up {gen.hex_id()}. " + gen.text(num_tokens) for _ in range(min(2, num_requests))]
    requests = [
        BenchRequest(index=i, workload="warm-up", group=f"warm-up-{i % 2}",
                     messages=[{"role": "user", "content": f"{texts[i % 2]}\n\nPart {i}."}], max_tokens=4)
        for i in range(num_requests)
    ]
    config = LoadConfig(base_url=base_url, model=model, api_key=api_key, concurrency=concurrency,
                        ignore_eos=ignore_eos, progress=False)
    run = run_load_sync(requests, config, "warm-up")
    failed = [r for r in run.results if not r.ok]
    if failed:
        raise RuntimeError(f"warm-up request failed against {base_url}: {failed[0].error}")


def reset_prefix_cache(base_url: str, api_key: str | None = None) -> bool:
    """Empty the server's prefix cache, so each workload starts cold: radixserve's and vLLM's
    POST /reset_prefix_cache, SGLang's /flush_cache. False when the server has neither."""
    root = base_url.rstrip("/").removesuffix("/v1")
    headers = LoadConfig(base_url=base_url, model="", api_key=api_key).headers()
    for path in ("/reset_prefix_cache", "/flush_cache"):
        try:
            response = httpx.post(root + path, headers=headers, timeout=60)
        except httpx.HTTPError:
            return False
        if response.status_code < 300:
            return True
    return False

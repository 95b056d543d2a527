"""EngineClient: the one interface the server's handlers use to reach the engine.

Two implementations: AsyncEngine (async_engine.py) steps an LLMEngine on a thread of the server
process; EngineProcessClient (engine_process.py) talks to an engine core in its own process over
ZeroMQ (--engine-process). Handlers see only this surface: add requests and stream their
outputs (RequestStream), abort them, and a small set of *named* engine calls (snapshot, pins,
shared prefixes, ...), each an entry of ENGINE_CALLS, so that the process client can name them
on the wire instead of shipping code. Facts fixed at start (context length, block size, ...)
are in `info`, read without asking the engine.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from radixserve.cache.radix_tree import PinnedEdge
from radixserve.engine import EngineSnapshot
from radixserve.request import CachePin, CachePolicy, RequestOutput
from radixserve.sampling import SamplingParams

if TYPE_CHECKING:
    from radixserve.engine import LLMEngine
    from radixserve.model.tokenizer import Tokenizer


class EngineDeadError(RuntimeError):
    """The engine is not running (stopped, its process died, or a step failed for this request)."""

    status = 503


class RequestFailedError(EngineDeadError):
    """This request failed inside the engine (finish reason "error"); the others carry on."""

    status = 500


def joined(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: `later` with both deltas."""
    return dataclasses.replace(
        later, new_token_ids=earlier.new_token_ids + later.new_token_ids, new_text=earlier.new_text + later.new_text,
        new_logprobs=earlier.new_logprobs + later.new_logprobs,
    )


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """A request's options besides its prompt and sampling (LLMEngine.add_request's), defined
    once for every EngineClient and the calls into them."""

    request_id: str
    namespace: str = ""  # the tenant's cache namespace
    cache_pins: list[CachePin] | None = None
    arrival_time: float | None = None
    cache_policy: CachePolicy = CachePolicy.READ_WRITE
    cache_report: bool = False  # the final output carries a CacheReport ...
    cache_report_namespaces: tuple[str, ...] = ()  # ... which may name these other namespaces of the caller


class RequestStream:
    """The outputs of one request, in order; iterate with `async for`.

    Leaving early (break, an exception, cancellation when the client hangs up) must abort the
    request so its blocks go back to the pool: use it as `async with stream:` or call close().
    """

    def __init__(self, engine: EngineClient, request_id: str, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self.final: RequestOutput | None = None
        self._aborted = False
        self.not_before: float | None = None  # monotonic time before which no output is handed out (TTFT floor)
        self._held: BaseException | None = None  # an error queued behind outputs that were merged

    async def next(self) -> RequestOutput:
        """The next output; raises StopAsyncIteration after the final one. Outputs that queued
        up meanwhile (the engine outpaced this consumer) come as one, their deltas joined: a
        lagging stream then costs one event per read, not one per token (as vLLM's collector)."""
        if self.finished:
            raise StopAsyncIteration
        item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, BaseException):
                self._held = later
                break
            item = joined(item, later)
        if self.not_before is not None:
            wait, self.not_before = self.not_before - time.monotonic(), None
            if wait > 0:
                await asyncio.sleep(wait)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            self.final = item
            if item.finish_reason == "error":
                raise RequestFailedError(f"the engine failed while running this request: {item.error}")
        return item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        return await self.next()

    async def result(self) -> RequestOutput:
        """Wait for the final output (its text and token ids are complete)."""
        while not self.finished:
            await self.next()
        assert self.final is not None
        return self.final

    def close(self) -> None:
        """Abort the request if it has not finished (idempotent). Its final output (finish
        reason "abort") still arrives, so a concurrent `result()` returns rather than hangs."""
        if not self.finished and not self._aborted:
            self._aborted = True
            self.engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True, frozen=True)
class EngineInfo:
    """What the server knows about its engine without asking it: fixed when the engine is built."""

    model_id: str
    model_source: str  # the --model value it was loaded from (e.g. "embedded")
    device: str
    max_model_len: int
    max_total_tokens: int  # prompt + output tokens one request can have (context and KV pool)
    block_size: int
    prefix_caching: bool
    num_kv_blocks: int
    pin_bounds: tuple[int, int] | None  # (total, per namespace) blocks pins may hold; None: cache off
    cache_identity: str

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineInfo:
        return cls(
            model_id=engine.model_id, model_source=engine.config.model.source, device=str(engine.device),
            max_model_len=engine.max_model_len, max_total_tokens=engine.max_total_tokens,
            block_size=engine.block_size, prefix_caching=engine.prefix_caching, num_kv_blocks=engine.num_kv_blocks,
            pin_bounds=engine.pin_bounds, cache_identity=engine.cache_identity,
        )


# ---- the named engine calls ------------------------------------------------------------------
# Each runs on the engine's own thread (or in its process) between steps, with the engine as its
# first argument. The process client sends the name and the arguments; the result comes back
# decoded as the type listed with it.


def _repin(engine: LLMEngine, token_ids: list[int], pinned: int, ttl: float, namespace: str) -> int:
    """Make a named cache's pin end in `ttl` seconds: the tree only ever extends a pin, so
    unpin + pin, in one call (no step, hence no eviction, in between). Returns tokens pinned."""
    if pinned:
        engine.unpin_prefix(token_ids[:pinned], namespace)
    return engine.pin_prefix(token_ids, ttl, namespace)


def _unpin_all(
    engine: LLMEngine, token_ids: list[int], lengths: list[int], namespace: str,
    keep_ids: list[int] | None, keep_pinned: int, keep_ttl: float,
) -> int:
    """Unpin every prefix length of a dropped named cache, then re-pin the twin that keeps the
    node (`keep_ids`), if any. Returns the twin's tokens pinned (0: none)."""
    for n in lengths:
        engine.unpin_prefix(token_ids[:n], namespace)
    if keep_ids is None or keep_ttl <= 0:
        return 0
    return _repin(engine, keep_ids, keep_pinned, keep_ttl, namespace)


def _publish_shared_prefix(engine: LLMEngine, name: str, token_ids: list[int]) -> None:
    engine.publish_shared_prefix(name, token_ids)  # the Request it queues stays in the engine


@dataclass(slots=True, frozen=True)
class EngineCall:
    fn: Callable[..., Any]  # fn(engine, *args)
    returns: Any  # the result's type (what the process client decodes it as)


ENGINE_CALLS: dict[str, EngineCall] = {
    "snapshot": EngineCall(lambda engine: engine.snapshot(), EngineSnapshot),
    "reset_prefix_cache": EngineCall(lambda engine: engine.reset_prefix_cache(), int),
    "pinned_paths": EngineCall(lambda engine: engine.pinned_paths(), list[PinnedEdge]),
    "check_cache_invariants": EngineCall(lambda engine: engine.check_cache_invariants(), type(None)),
    "pinned_blocks": EngineCall(lambda engine, namespace: engine.pinned_blocks(namespace), int),
    "publish_shared_prefix": EngineCall(_publish_shared_prefix, type(None)),
    "shared_prefix_cached_tokens": EngineCall(lambda engine, name: engine.shared_prefix_cached_tokens(name), int),
    "withdraw_shared_prefix": EngineCall(lambda engine, name: engine.withdraw_shared_prefix(name), bool),
    "repin": EngineCall(_repin, int),
    "unpin_all": EngineCall(_unpin_all, int),
}


class EngineClient(abc.ABC):
    """Requests in, streamed outputs back, named engine calls; `start()` inside the event loop
    that consumes the outputs, `stop()` at shutdown.

    on_finished, if given, is called on the event loop with every finished request's output
    (aborted ones included): the metrics hook.
    """

    info: EngineInfo
    tokenizer: Tokenizer
    on_finished: Callable[[RequestOutput], None] | None

    # ---- lifecycle ------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self) -> None:
        """Start serving; must run inside the event loop that will consume outputs."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop after the current step; unfinished requests get EngineDeadError."""

    @abc.abstractmethod
    async def close(self) -> None:
        """After stop(): write the prefix cache down to the KV store, if any (LLMEngine.close)."""

    @property
    @abc.abstractmethod
    def is_running(self) -> bool:
        """False once stopped, or when the engine died (/health answers 503)."""

    # ---- requests -------------------------------------------------------------------------
    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams, **options: Any) -> RequestStream:
        """Queue a request (params.n == 1; `options`: the fields of RequestOptions); returns once
        the engine accepted it. Bad input raises here (InvalidRequestError, PromptTooLongError),
        before any response has been started."""
        assert params.n == 1, "add_choices takes n > 1"
        return (await self.add_choices(prompt_token_ids, params, RequestOptions(**options)))[0]

    @abc.abstractmethod
    async def add_choices(
        self, prompt_token_ids: list[int], params: SamplingParams, options: RequestOptions
    ) -> list[RequestStream]:
        """Queue a request of params.n choices (one prefill, shared); one stream per choice, in
        index order. Bad input raises here, as in add_request."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request (returns at once); its final output still arrives."""

    async def _until_accepted(self, add: Awaitable[Any], ids: list[str], streams: dict[str, Any]) -> None:
        """Await `add`, the engine accepting the choices `ids`. If it fails their `streams` go;
        if the caller is cancelled they are aborted too: the add may still run in the engine,
        and the request must die with its caller."""
        try:
            await add
        except BaseException as e:
            for rid in ids:
                streams.pop(rid, None)
                if isinstance(e, asyncio.CancelledError):
                    self.abort(rid)
            raise

    # ---- named engine calls -----------------------------------------------------------------
    @abc.abstractmethod
    async def call_named(self, name: str, *args: Any) -> Any:
        """Run ENGINE_CALLS[name] with `args` between steps and return its result (or raise)."""

    def forget_pin_owner(self, owner: str) -> None:
        """The named cache `owner` is gone: a pin of a request still running on its behalf
        (CachePin.owner) must not be applied. In-thread, CachePin.alive already says so."""

    async def snapshot(self) -> EngineSnapshot:
        return await self.call_named("snapshot")

    async def reset_prefix_cache(self) -> int:
        return await self.call_named("reset_prefix_cache")

    async def pinned_paths(self) -> list[PinnedEdge]:
        return await self.call_named("pinned_paths")

    async def check_cache_invariants(self) -> None:
        await self.call_named("check_cache_invariants")

    async def pinned_blocks(self, cache_namespace: str | None = None) -> int:
        """KV blocks pins hold now: all, or those of one cache namespace."""
        return await self.call_named("pinned_blocks", cache_namespace)

    async def publish_shared_prefix(self, name: str, token_ids: list[int]) -> None:
        await self.call_named("publish_shared_prefix", name, token_ids)

    async def shared_prefix_cached_tokens(self, name: str) -> int:
        return await self.call_named("shared_prefix_cached_tokens", name)

    async def withdraw_shared_prefix(self, name: str) -> bool:
        return await self.call_named("withdraw_shared_prefix", name)

    async def repin(self, token_ids: list[int], pinned: int, ttl: float, namespace: str) -> int:
        return await self.call_named("repin", token_ids, pinned, ttl, namespace)

    async def unpin_all(self, token_ids: list[int], lengths: list[int], namespace: str,
                        keep_ids: list[int] | None, keep_pinned: int, keep_ttl: float) -> int:
        return await self.call_named("unpin_all", token_ids, lengths, namespace, keep_ids, keep_pinned, keep_ttl)


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as (index, output), in arrival order (batched completions)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            if item.finished:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()

"""AsyncEngine: drives an LLMEngine from one dedicated thread of the server process, talks to
asyncio through queues (the in-thread EngineClient; engine_process.py has the other).

The LLMEngine is single-threaded by design. Here exactly one thread ever touches it: the engine
thread runs queued commands (add, abort, arbitrary calls such as pinning or reading gauges)
*between* steps, then runs a step, then hands that step's outputs to the event loop in one
`call_soon_threadsafe`. HTTP handlers therefore never block on a forward pass, and the engine
never sees two callers at once. When there is nothing to do the thread sleeps on a condition.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from radixserve.engine import LLMEngine
from radixserve.request import RequestOutput, choice_request_ids
from radixserve.sampling import SamplingParams
from radixserve.server.engine_client import (  # noqa: F401 - RequestStream and the errors: re-exported
    ENGINE_CALLS,
    EngineClient,
    EngineDeadError,
    EngineInfo,
    RequestFailedError,
    RequestOptions,
    RequestStream,
    merge_streams,
)

log = logging.getLogger("radixserve.server")


@dataclass(slots=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple
    future: asyncio.Future | None  # None: fire and forget (aborts)


class AsyncEngine(EngineClient):
    """Owns the engine thread. Create it, `start()` it from inside the event loop, `stop()` it.

    on_finished, if given, is called on the event loop with every finished request's output
    (aborted ones included): the metrics hook.
    """

    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None) -> None:
        self.engine = engine
        self.info = EngineInfo.of(engine)
        self.tokenizer = engine.tokenizer
        self.on_finished = on_finished
        self._cond = threading.Condition()
        self._commands: deque[_Call] = deque()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; must run inside the event loop that will consume outputs."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="radixserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread after its current step; unfinished requests get EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for queue in self._streams.values():
            queue.put_nowait(EngineDeadError("the server is shutting down"))
        self._streams.clear()

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- API for the event loop ---------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the engine thread between steps and return its result (or raise)."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        assert self._loop is not None
        future = self._loop.create_future()
        self._submit(_Call(fn, args, future))
        return await future

    async def call_named(self, name: str, *args: Any) -> Any:
        return await self.call(ENGINE_CALLS[name].fn, self.engine, *args)

    async def add_choices(
        self, prompt_token_ids: list[int], params: SamplingParams, options: RequestOptions
    ) -> list[RequestStream]:
        ids = choice_request_ids(options.request_id, params.n)
        queues = {rid: asyncio.Queue() for rid in ids}
        self._streams.update(queues)
        add = self.call(
            self.engine.add_request, prompt_token_ids, params, options.request_id, options.namespace,
            options.cache_pins, options.arrival_time, options.cache_policy, options.cache_report,
            options.cache_report_namespaces,
        )
        await self._until_accepted(add, ids, self._streams)
        return [RequestStream(self, rid, queues[rid]) for rid in ids]

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, returns at once); its final output still arrives."""
        self._submit(_Call(self.engine.abort_request, (request_id,), None))

    # ---- the engine thread ----------------------------------------------------------------
    def _submit(self, call: _Call) -> None:
        with self._cond:
            self._commands.append(call)
            self._cond.notify()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not engine.has_unfinished_requests():
                    self._cond.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for call in commands:
                self._execute(call)
            if engine.has_unfinished_requests():
                self._step()

    def _execute(self, call: _Call) -> None:
        try:
            result = call.fn(*call.args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            if call.future is None:
                log.exception("engine command %s failed", getattr(call.fn, "__name__", call.fn))
            else:
                self._post(_resolve, call.future, None, e)
            return
        if call.future is not None:
            self._post(_resolve, call.future, result, None)
        elif isinstance(result, RequestOutput):  # an abort's final output
            self._post(self._deliver, [result])

    def _step(self) -> None:
        stalled_before = self.engine.stats.stalled_steps
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug, not bad input: fail the running requests, keep serving
            log.exception("engine step failed; aborting its requests")
            self._fail_all(e)
            return
        if outputs:
            self._post(self._deliver, outputs)
        elif self.engine.stats.stalled_steps != stalled_before:
            # nothing could be scheduled (e.g. the pool is full of pinned blocks): don't spin. A step
            # with only loading requests already waited on their reads: it is followed at once.
            with self._cond:
                if not self._commands and not self._stopping:
                    self._cond.wait(0.01)

    def _fail_all(self, error: Exception) -> None:
        dead = EngineDeadError(f"the engine failed while running this request: {error}")
        for request_id in self.engine.unfinished_request_ids():
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - best effort; the engine drops the request either way
                log.exception("could not abort %s", request_id)
            self._post(self._fail, request_id, dead)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call (shutdown)
            pass

    # ---- back on the event loop -------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
            if out.finished:
                self._streams.pop(out.request_id, None)
                if self.on_finished is not None:
                    try:
                        self.on_finished(out)
                    except Exception:  # noqa: BLE001 - metrics must never break serving
                        log.exception("on_finished hook failed")

    def _fail(self, request_id: str, error: BaseException) -> None:
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

"""EngineProcessClient: the EngineClient whose engine steps in a process of its own.

The server process keeps HTTP, SSE framing, tokenization and chat templates; the engine core
(engine_core.py) runs the scheduler, the model and detokenization, so neither waits on the
other's interpreter lock. They talk over two local ZeroMQ channels (IPC sockets in a private
temporary directory) in msgspec MessagePack frames (wire.py): commands in, and back, per step,
one frame with the *new* tokens and text of every request that produced some.

Failure: when the core process exits unexpectedly, every in-flight request ends at once with
EngineDeadError (a clean error event / 503), /health answers 503, and new requests are refused:
the server keeps failing cleanly rather than restarting the core in place, so that a supervisor
(systemd, Kubernetes) restarts the whole server, whose --state-dir brings named caches and pins
back. Nothing is left behind: the core exits when the server stops it, and on its own when the
server process dies (even by SIGKILL).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from radixserve.config import EngineConfig
from radixserve.errors import ModelLoadError
from radixserve.request import CachePolicy, RequestMetrics, RequestOutput, choice_request_ids
from radixserve.sampling import SamplingParams
from radixserve.server import wire
from radixserve.server.engine_client import (
    ENGINE_CALLS,
    EngineClient,
    EngineDeadError,
    EngineInfo,
    RequestOptions,
    RequestStream,
)

log = logging.getLogger("radixserve.server")

_SHUTDOWN_WAIT_S = 120.0  # the core writes the prefix cache down to the KV store before it exits
_EXIT_POLL_S = 0.5  # without pidfd_open: how often the client looks whether the core still runs


@dataclass(slots=True)
class _Stream:
    """What the client keeps of one request: the deltas' running totals and the prompt."""

    queue: asyncio.Queue
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] | None = None  # when the request asked for them


class EngineProcessClient(EngineClient):
    """Start the core with `launch()` (loads the model there; blocks until it is ready), then
    `start()` inside the event loop, `stop()` at shutdown."""

    def __init__(self, process: subprocess.Popen, info: EngineInfo, tokenizer: Any, directory: str) -> None:
        self.process = process
        self.info = info
        self.tokenizer = tokenizer
        self.on_finished = None
        self._directory = directory  # holds the two IPC sockets
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: zmq.Context | None = None
        self._async_context: zmq.asyncio.Context | None = None
        self._to_core: zmq.Socket | None = None
        self._from_core: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._exit_fd: int | None = None  # a pidfd of the core: readable once it exited
        self._exit_poller: asyncio.Task | None = None
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, tuple[asyncio.Future, Any]] = {}
        self._call_ids = itertools.count()
        self._encode = wire.encoder().encode
        self._decode = wire.from_core_decoder().decode
        self._stopping = False
        self._dead: str | None = None  # why the core is gone, once it is
        atexit.register(self._kill)  # a server that exits without stop() takes its core along

    @staticmethod
    def addresses(directory: str) -> tuple[str, str]:
        return f"ipc://{directory}/to-core", f"ipc://{directory}/from-core"

    @classmethod
    def launch(cls, config: EngineConfig, log_level: str = "info", spin_count: int = 0) -> EngineProcessClient:
        """Start the engine core process and wait until its engine is built. Raises
        ModelLoadError (with the core's reason) when it cannot start. `spin_count`: on CPU, how
        long its OpenMP threads spin before they sleep (ServerConfig.engine_spin_count)."""
        directory = tempfile.mkdtemp(prefix="radixserve-core-")
        to_core, from_core = cls.addresses(directory)
        startup = {"config": config, "input_address": to_core, "output_address": from_core,
                   "parent_pid": os.getpid(), "log_level": log_level}
        read_fd, write_fd = os.pipe()
        # a fresh interpreter (not multiprocessing's spawn, which re-imports the caller's main
        # script); radixserve importable there as it is here
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        if config.model.device == "cpu":
            # OpenMP threads that spin while they wait for each other stall a busy process's steps
            # whenever the OS deschedules one of them (the server shares the cores): on a loaded
            # 2-core machine 10-20x slower steps than passive waiting, which costs nothing idle
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            if spin_count:
                # a short spin before the sleep: one forward's ops follow each other within
                # microseconds, so the threads stay awake through a step but sleep between steps
                env.setdefault("GOMP_SPINCOUNT", str(spin_count))
        try:
            process = subprocess.Popen([sys.executable, "-m", "radixserve.server.engine_core", str(write_fd)],
                                       stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
        finally:
            os.close(write_fd)
        try:
            process.stdin.write(pickle.dumps(startup))
            process.stdin.close()
            message = pickle.loads(_read_until_eof(read_fd, process))
        except BaseException:
            if process.poll() is None:
                process.kill()
            process.wait()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            os.close(read_fd)
        if message[0] == "error":
            process.wait(30)
            shutil.rmtree(directory, ignore_errors=True)
            _, error_type, text = message
            raise ValueError(text) if error_type == "ValueError" else ModelLoadError(f"{error_type}: {text}")
        _, info, tokenizer = message
        log.info("engine core process %d ready (%s on %s)", process.pid, info.model_id, info.device)
        return cls(process, info, tokenizer, directory)

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("EngineProcessClient already started")
        self._loop = asyncio.get_running_loop()
        to_core, from_core = self.addresses(self._directory)
        # The core bound both sockets before it said ready. A connecting PUSH queues frames at
        # once (no wait for the peer) and, with no high-water mark, a send never blocks.
        self._context = zmq.Context()
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.SNDHWM, 0)
        self._to_core.connect(to_core)
        self._async_context = zmq.asyncio.Context()
        self._from_core = self._async_context.socket(zmq.PULL)
        self._from_core.setsockopt(zmq.RCVHWM, 0)
        self._from_core.connect(from_core)
        self._reader = self._loop.create_task(self._read(), name="radixserve-engine-core-reader")
        try:
            self._exit_fd = os.pidfd_open(self.process.pid)
            self._loop.add_reader(self._exit_fd, self._on_core_exit)
        except (AttributeError, OSError):  # not Linux >= 5.3: look now and then
            self._exit_poller = self._loop.create_task(self._poll_exit())

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_watching_exit()
        if self.process.poll() is None and self._to_core is not None:
            self._send(wire.Shutdown())
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.process.wait, _SHUTDOWN_WAIT_S)
        self._kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_everything("the server is shutting down")
        for socket in (self._to_core, self._from_core):
            if socket is not None:
                socket.close(linger=0)
        for context in (self._context, self._async_context):
            if context is not None:
                context.term()
        shutil.rmtree(self._directory, ignore_errors=True)
        atexit.unregister(self._kill)

    async def close(self) -> None:
        """Nothing left to do: the core wrote its prefix cache down before it exited (stop())."""

    @property
    def is_running(self) -> bool:
        return self._loop is not None and not self._stopping and self._dead is None

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    # ---- requests ---------------------------------------------------------------------
    async def add_choices(
        self, prompt_token_ids: list[int], params: SamplingParams, options: RequestOptions
    ) -> list[RequestStream]:
        self._check_running()
        ids = choice_request_ids(options.request_id, params.n)
        want_logprobs = params.logprobs is not None
        records = {rid: _Stream(asyncio.Queue(), prompt_token_ids, logprobs=[] if want_logprobs else None)
                   for rid in ids}
        self._streams.update(records)
        pins = [wire.WirePin(p.num_tokens, p.ttl, p.refresh, p.owner) for p in options.cache_pins or ()]
        policy = options.cache_policy
        policy = policy.value if isinstance(policy, CachePolicy) else str(policy)
        add = self._call(type(None), lambda call_id: wire.AddRequest(
            call_id, options.request_id, prompt_token_ids, _params_map(params), options.namespace, pins,
            options.arrival_time, policy, options.cache_report, list(options.cache_report_namespaces),
        ))
        await self._until_accepted(add, ids, self._streams)
        return [RequestStream(self, rid, records[rid].queue) for rid in ids]

    def abort(self, request_id: str) -> None:
        if self.is_running:
            self._send(wire.Abort([request_id]))

    def forget_pin_owner(self, owner: str) -> None:
        if self.is_running:
            self._send(wire.ForgetOwner(owner))

    async def call_named(self, name: str, *args: Any) -> Any:
        self._check_running()
        return await self._call(ENGINE_CALLS[name].returns, lambda call_id: wire.Call(call_id, name, list(args)))

    # ---- the channel --------------------------------------------------------------------
    def _check_running(self) -> None:
        if not self.is_running:
            raise EngineDeadError(self._dead or "the engine is not running")

    async def _call(self, returns: Any, message: Any) -> Any:
        assert self._loop is not None
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = (future, returns)
        self._send(message(call_id))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _send(self, message: Any) -> None:
        assert self._to_core is not None
        self._to_core.send(self._encode(message), copy=False)

    async def _read(self) -> None:
        assert self._from_core is not None
        while True:
            frame = await self._from_core.recv(copy=False)
            try:
                message = self._decode(frame.buffer)
                if isinstance(message, wire.Outputs):
                    self._deliver(message.outputs)
                elif isinstance(message, wire.CallResult):
                    self._resolve(message)
                elif isinstance(message, wire.Failed):
                    dead = EngineDeadError(f"the engine failed while running this request: {message.error}")
                    for request_id in message.request_ids:
                        record = self._streams.pop(request_id, None)
                        if record is not None:
                            record.queue.put_nowait(dead)
            except Exception:  # noqa: BLE001 - one bad frame must not stop every stream
                log.exception("could not handle a frame from the engine core")

    def _resolve(self, result: wire.CallResult) -> None:
        pending = self._calls.get(result.call_id)
        if pending is None or pending[0].done():  # the caller was cancelled meanwhile
            return
        future, returns = pending
        if result.error_type is not None:
            future.set_exception(wire.error_from_wire(result.error_type, result.error))
        else:
            future.set_result(msgspec.msgpack.decode(result.value, type=returns))

    def _deliver(self, deltas: list[wire.OutputDelta]) -> None:
        for delta in deltas:
            finished = delta.finished
            record = self._streams.pop(delta.request_id, None) if finished else self._streams.get(delta.request_id)
            if record is None:
                continue  # a request whose add was cancelled (it is aborted)
            out = _output(record, delta)
            record.queue.put_nowait(out)
            if finished and self.on_finished is not None:
                try:
                    self.on_finished(out)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    log.exception("on_finished hook failed")

    # ---- the core's death ----------------------------------------------------------------
    async def _poll_exit(self) -> None:
        while self.process.poll() is None:
            await asyncio.sleep(_EXIT_POLL_S)
        self._on_core_exit()

    def _stop_watching_exit(self) -> None:
        if self._exit_fd is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._exit_fd)
            os.close(self._exit_fd)
            self._exit_fd = None
        if self._exit_poller is not None and self._exit_poller is not asyncio.current_task():
            self._exit_poller.cancel()

    def _on_core_exit(self) -> None:
        self._stop_watching_exit()
        if self._stopping:
            return
        self._dead = f"the engine process exited unexpectedly (exit code {self.process.wait()})"
        log.error("%s: failing its %d requests; /health answers 503", self._dead, len(self._streams))
        if self._reader is not None:
            self._reader.cancel()
        self._fail_everything(self._dead)

    def _fail_everything(self, reason: str) -> None:
        error = EngineDeadError(reason)
        for record in self._streams.values():
            record.queue.put_nowait(error)
        self._streams.clear()
        for future, _ in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._calls.clear()


def _read_until_eof(fd: int, process: subprocess.Popen) -> bytes:
    """Everything the core writes on the handshake pipe; ModelLoadError if it exits first."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    if not chunks:
        raise ModelLoadError(f"the engine process exited (code {process.wait()}) before it was ready")
    return b"".join(chunks)


def _params_map(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams as the map the core rebuilds them from (guided as {kind, value})."""
    return msgspec.to_builtins(params)


def _output(record: _Stream, delta: wire.OutputDelta) -> RequestOutput:
    """The RequestOutput the engine made, from its delta and the running totals."""
    record.token_ids += delta.new_token_ids
    record.text.append(delta.new_text)
    if record.logprobs is not None:
        record.logprobs += delta.new_logprobs
    finished = delta.finished
    if finished:
        token_ids = delta.token_ids if delta.token_ids is not None else record.token_ids
        text = delta.text if delta.text is not None else "".join(record.text)
    else:
        token_ids, text = [], ""
    return RequestOutput(
        request_id=delta.request_id, prompt=None, prompt_token_ids=record.prompt_token_ids,
        new_token_ids=delta.new_token_ids, new_text=delta.new_text, finished=finished,
        finish_reason=delta.finish_reason, stop_reason=delta.stop_reason, num_cached_tokens=delta.num_cached_tokens,
        metrics=RequestMetrics(*delta.metrics), token_ids=token_ids, text=text,
        cache_write_tokens=delta.cache_write_tokens, error=delta.error, num_pinned_tokens=delta.num_pinned_tokens,
        logprobs=record.logprobs if finished else None, new_logprobs=delta.new_logprobs, index=delta.index,
        cached_tokens_by_tier=delta.cached_tokens_by_tier, cache_report=delta.cache_report,
    )

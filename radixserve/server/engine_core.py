"""The engine core process: one LLMEngine stepping in a process of its own (--engine-process).

The server's EngineProcessClient (engine_process.py) starts it as
`python -m radixserve.server.engine_core HANDSHAKE_FD` (a fresh interpreter: nothing of the
server's state is inherited, and no script's main module is re-imported) and writes its start-up
arguments (EngineConfig, addresses, parent pid) to its stdin. The core
binds two ZeroMQ channels (wire.py has the messages): it reads commands between steps, runs a
step whenever a request is unfinished, and sends each step's outputs back as one frame of
deltas. Nothing here parses HTTP or renders prompts: the server tokenizes, and the core runs the
scheduler, the model and the incremental detokenizer (stop strings are checked on its text).

Lifetime: the core stops when the server sends Shutdown (after writing the prefix cache down to
the KV store, as LLMEngine.close does in-thread); it is killed with the server (PR_SET_PDEATHSIG
on Linux) and, elsewhere, exits when it sees that its parent is gone: it never outlives the server. SIGINT and SIGTERM are ignored, so that a
signal sent to the whole process group (Ctrl-C, a service manager stopping it) lets the server
drain its requests first; the server's Shutdown then ends the core.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from collections import OrderedDict
from typing import Any

import msgspec
import zmq

from radixserve.config import EngineConfig
from radixserve.engine import LLMEngine
from radixserve.request import CachePin, RequestOutput
from radixserve.sampling import SamplingParams
from radixserve.server import wire
from radixserve.server.engine_client import ENGINE_CALLS, EngineInfo
from radixserve.structured import GuidedSpec

log = logging.getLogger("radixserve.engine_core")

_IDLE_POLL_MS = 1000  # how long an idle core sleeps before it looks at its parent again
_STALLED_POLL_MS = 10  # nothing could be scheduled (e.g. the pool is full of pinned blocks): don't spin
_MAX_GONE_OWNERS = 65536  # named caches remembered as deleted (their ids are never reused)
_NIL = msgspec.Raw(b"\xc0")  # MessagePack nil: the value of a call that raised


def main(argv: list[str]) -> None:
    """The core process: read the start-up arguments from stdin, build the engine, answer on the
    handshake pipe (a pickled ("ready", EngineInfo, tokenizer) or ("error", type name, message),
    then EOF), and serve. The server trusts this pipe as it trusts its own child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handshake = os.fdopen(int(argv[0]), "wb")
    startup = pickle.loads(sys.stdin.buffer.read())
    _die_with_parent(startup["parent_pid"])
    logging.basicConfig(format="%(levelname)s:     [engine core] %(message)s", level=startup["log_level"].upper())
    try:
        engine = LLMEngine(startup["config"])
        core = EngineCore(engine, startup["input_address"], startup["output_address"], startup["parent_pid"])
    except BaseException as e:  # noqa: BLE001 - reported to the server, which fails its start-up
        with handshake:
            pickle.dump(("error", type(e).__name__, str(e)), handshake)
        return
    # the tokenizer goes to the server once (it tokenizes requests and renders chat templates)
    with handshake:
        pickle.dump(("ready", EngineInfo.of(engine), engine.tokenizer), handshake)
    core.run()


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, be killed the moment the server dies (as an engine thread dies with it: a
    restarted server then finds the KV store's lock free at once). The parent-pid check in the
    loop covers other systems. PR_SET_PDEATHSIG is tied to the thread that started this process:
    the server starts it from a thread that lives as long as the server (create_app's caller)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the prctl
        os._exit(1)


class EngineCore:
    """Serves one LLMEngine over the two channels until Shutdown or its parent's death."""

    def __init__(self, engine: LLMEngine, input_address: str, output_address: str, parent_pid: int) -> None:
        self.engine = engine
        self.parent_pid = parent_pid
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PULL)
        self._input.setsockopt(zmq.RCVHWM, 0)  # never drop or block: the server bounds what it sends
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PUSH)
        self._output.setsockopt(zmq.SNDHWM, 0)
        self._output.bind(output_address)
        self._encode = wire.encoder().encode
        self._decode = wire.to_core_decoder().decode
        self._pending: list[wire.OutputDelta] = []  # outputs of this loop turn, sent as one frame
        self._emitted: dict[str, tuple[int, int]] = {}  # request -> (tokens, characters) sent so far
        self._gone_owners: OrderedDict[str, None] = OrderedDict()
        self._stopping = False

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        poll_ms = _IDLE_POLL_MS
        try:
            while True:
                self._receive(0 if engine.has_unfinished_requests() else poll_ms)
                if self._stopping:
                    break
                if os.getppid() != self.parent_pid:
                    log.warning("the server process is gone: the engine core exits")
                    break
                poll_ms = _IDLE_POLL_MS
                if engine.has_unfinished_requests() and not self._step():
                    poll_ms = _STALLED_POLL_MS
                    self._receive(poll_ms)
                self._flush()
        finally:
            self._flush()
            engine.close()  # the prefix cache goes down to the KV store, if any
            self._input.close(linger=0)
            self._output.close(linger=1000)  # the last frames reach the server
            self._context.term()

    def _receive(self, timeout_ms: int) -> None:
        """Handle every command that arrives within `timeout_ms` (0: those already queued)."""
        if not self._input.poll(timeout_ms):
            return
        while True:
            try:
                frame = self._input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(self._decode(frame))

    def _step(self) -> bool:
        """One engine step; False when nothing could be scheduled (EngineStats.stalled_steps;
        a step that waited for a storage read is not stalled: the next one follows at once)."""
        engine = self.engine
        stalled_before = engine.stats.stalled_steps
        try:
            outputs = engine.step()
        except Exception as e:  # a bug, not bad input: fail the running requests, keep serving
            log.exception("engine step failed; aborting its requests")
            self._fail_all(e)
            return True
        self._pending.extend(self._delta(out) for out in outputs)
        return engine.stats.stalled_steps == stalled_before

    def _flush(self) -> None:
        if self._pending:
            self._send(wire.Outputs(self._pending))
            self._pending = []

    def _send(self, message: Any) -> None:
        self._output.send(self._encode(message), copy=False)

    # ---- commands ---------------------------------------------------------------------------
    def _handle(self, message: Any) -> None:
        if isinstance(message, wire.AddRequest):
            self._answer(message.call_id, self._add_request, message)
        elif isinstance(message, wire.Abort):
            for request_id in message.request_ids:
                self._abort(request_id)
        elif isinstance(message, wire.Call):
            call = ENGINE_CALLS.get(message.name)
            if call is None:
                self._send(wire.CallResult(message.call_id, _NIL, "ValueError", f"no engine call {message.name!r}"))
            else:
                self._answer(message.call_id, call.fn, self.engine, *message.args)
        elif isinstance(message, wire.ForgetOwner):
            self._gone_owners[message.owner] = None
            if len(self._gone_owners) > _MAX_GONE_OWNERS:
                self._gone_owners.popitem(last=False)
        elif isinstance(message, wire.Shutdown):
            self._stopping = True

    def _answer(self, call_id: int, fn: Any, *args: Any) -> None:
        """Run fn(*args) and send its value (or the error it raised) back at once."""
        try:
            value = fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to the awaiting handler
            self._send(wire.CallResult(call_id, _NIL, type(e).__name__, str(e)))
            return
        self._send(wire.CallResult(call_id, msgspec.Raw(self._encode(value))))

    def _add_request(self, message: wire.AddRequest) -> None:
        params = dict(message.params)
        guided = params.pop("guided", None)
        try:
            sampling = SamplingParams(**params, guided=GuidedSpec(**guided) if guided is not None else None)
        except TypeError as e:  # a field this engine does not know: a version mismatch
            raise ValueError(f"bad sampling parameters: {e}") from None
        pins = [CachePin(p.num_tokens, p.ttl, alive=self._owner_alive(p.owner), refresh=p.refresh, owner=p.owner)
                for p in message.cache_pins]
        self.engine.add_request(
            message.prompt_token_ids, sampling, message.request_id, message.namespace, pins or None,
            message.arrival_time, message.cache_policy, message.cache_report, tuple(message.cache_report_namespaces),
        )

    def _owner_alive(self, owner: str | None):
        if owner is None:
            return None
        return lambda: owner not in self._gone_owners

    def _abort(self, request_id: str) -> None:
        try:
            out = self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - the engine drops the request either way
            log.exception("could not abort %s", request_id)
            return
        if out is not None:
            self._pending.append(self._delta(out))

    def _fail_all(self, error: Exception) -> None:
        failed = self.engine.unfinished_request_ids()
        for request_id in failed:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - best effort; the engine drops the request either way
                log.exception("could not abort %s", request_id)
            self._emitted.pop(request_id, None)
        self._send(wire.Failed(failed, str(error)))

    # ---- outputs ------------------------------------------------------------------------------
    def _delta(self, out: RequestOutput) -> wire.OutputDelta:
        """`out` as a delta. The client rebuilds a finished output's whole token ids and text by
        concatenating the deltas; in the rare case that would not give the engine's (a final text
        decoded afresh), the whole is sent once, with the final delta."""
        num_tokens, num_chars = self._emitted.pop(out.request_id, (0, 0))
        num_tokens += len(out.new_token_ids)
        num_chars += len(out.new_text)
        whole_tokens = whole_text = None
        if out.finished:
            if len(out.token_ids) != num_tokens:
                whole_tokens = out.token_ids
            if len(out.text) != num_chars or not out.text.endswith(out.new_text):
                whole_text = out.text
        else:
            self._emitted[out.request_id] = (num_tokens, num_chars)
        m = out.metrics
        return wire.OutputDelta(
            out.request_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason, out.stop_reason,
            out.num_cached_tokens, (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finish_time),
            cache_write_tokens=out.cache_write_tokens, error=out.error, num_pinned_tokens=out.num_pinned_tokens,
            new_logprobs=out.new_logprobs, index=out.index, cached_tokens_by_tier=out.cached_tokens_by_tier,
            cache_report=out.cache_report, token_ids=whole_tokens, text=whole_text,
        )


if __name__ == "__main__":
    main(sys.argv[1:])

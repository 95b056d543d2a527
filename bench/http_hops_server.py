"""`radixserve serve` with a timestamp at each hop of a chat request, for bench/bench_cpu_http_hops.py.

    HOPS_FILE=path python bench/http_hops_server.py serve [serve flags]

Wraps a few functions of the server process from outside (nothing in radixserve knows about it)
and appends one JSON line per /v1/chat/completions request of time.monotonic() readings (one
clock for every process of the machine): the request reached the app (asgi_start), the prompt
was built (build_start, build_end), it was handed to the engine (submit_start; the engine's own
metrics: arrival, scheduled, first_token), the engine acknowledged it (submit_end), its first
output reached the handler (stream_out) and the first content chunk was sent (content_sent).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import radixserve.server as server_package  # noqa: E402
from radixserve.cli import main  # noqa: E402
from radixserve.server import openai_api  # noqa: E402
from radixserve.server.engine_client import RequestStream  # noqa: E402
from radixserve.server.state import ServerState  # noqa: E402

_out = open(os.environ["HOPS_FILE"], "a")  # noqa: SIM115 - the process's lifetime
_events: dict[str, float] = {}  # of the one request in flight (the bench sends one at a time)


def _mark(name: str) -> None:
    _events.setdefault(name, time.monotonic())


_build_prompt = openai_api.build_prompt


def _timed_build_prompt(*args, **kwargs):
    _mark("build_start")
    prompt = _build_prompt(*args, **kwargs)
    _mark("build_end")
    return prompt


_submit_choices = ServerState.submit_choices


async def _timed_submit_choices(self, *args, **kwargs):
    _mark("submit_start")
    streams = await _submit_choices(self, *args, **kwargs)
    _mark("submit_end")
    return streams


_next = RequestStream.next


async def _timed_next(self):
    out = await _next(self)
    if "stream_out" not in _events:
        _mark("stream_out")
        m = out.metrics
        _events.update(arrival=m.arrival_time, scheduled=m.first_scheduled_time, first_token=m.first_token_time)
    return out


_create_app = server_package.create_app


def _timed_create_app(*args, **kwargs):
    app = _create_app(*args, **kwargs)

    async def timed_app(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await app(scope, receive, send)
        _events.clear()
        _mark("asgi_start")

        async def timed_send(message):
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            if b'"content": "' in body and b'"content": ""' not in body:
                _mark("content_sent")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                _out.write(json.dumps(_events) + "\n")
                _out.flush()

        await app(scope, receive, timed_send)

    return timed_app


openai_api.build_prompt = _timed_build_prompt
ServerState.submit_choices = _timed_submit_choices
RequestStream.next = _timed_next
server_package.create_app = _timed_create_app

if __name__ == "__main__":
    sys.exit(main())

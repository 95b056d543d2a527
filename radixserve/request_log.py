"""RequestLogWriter: the opt-in request log that the server writes and `radixserve advise` replays.

One JSON object per line (plus, for requests that asked for one, a cache report line
``{"ts": ..., "request_id": ..., "cache_report": {...}}`` with no body, which a replay skips)::

    {"ts": 1732400000.123, "api": "chat", "namespace": "", "body": {...the request body...}}

``ts`` is wall-clock seconds (the advisor uses gaps between requests for TTL what-ifs), ``api``
is one of :data:`API_KINDS` (which wire format ``body`` is in), ``namespace`` the prefix-cache
namespace the server used for the request (tenant key and cache_salt), so a replay keeps tenants
apart exactly as the engine did. The body is logged as received: prompts are re-rendered and
re-tokenized at analysis time, with the model the user asks about.

The log holds full prompts, which can be sensitive: it is off unless a path is given, and the
file is created readable by its owner only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

# Wire formats a record's body can be in. "prompt" is a bare {"prompt": ...} object.
API_KINDS = ("chat", "completions", "messages", "prompt")

# URL paths of the APIs, for logs written by other tools (OpenAI batch files carry "url").
API_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/messages": "messages",
}


class RequestLogWriter:
    """Append request bodies to a JSONL file, one line per request; safe to share across threads.

    >>> log = RequestLogWriter("requests.jsonl")
    >>> log.write("chat", {"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    >>> log.close()

    Each line is written with one ``write`` call under a lock and flushed, so concurrent handlers
    never interleave partial lines and a crash loses at most the line being written.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: several server processes may share one log without clobbering each other.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file: TextIO | None = os.fdopen(fd, "a", encoding="utf-8")
        self.num_written = 0

    def write(
        self,
        api: str,
        body: Mapping[str, Any],
        *,
        namespace: str = "",
        timestamp: float | None = None,
    ) -> None:
        """Log one request. ``api`` is one of API_KINDS; ``namespace`` the prefix-cache
        namespace the request ran in (``""`` for the default)."""
        if api not in API_KINDS:
            raise ValueError(f"unknown API kind {api!r} (expected one of {', '.join(API_KINDS)})")
        record: dict[str, Any] = {"ts": self.clock() if timestamp is None else timestamp, "api": api}
        if namespace:
            record["namespace"] = namespace
        record["body"] = body
        # ensure_ascii=False keeps non-Latin prompts readable and the file smaller.
        self._write_line(json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n")

    def write_cache_report(self, request_id: str, report: dict[str, Any], *, timestamp: float | None = None) -> None:
        """Log a finished request's cache report (usage.cache_report) as its own line,
        ``{"ts": ..., "request_id": ..., "cache_report": {...}}``: no body, so a replay skips it
        and `radixserve advise` counts the reasons."""
        record = {"ts": self.clock() if timestamp is None else timestamp, "request_id": request_id,
                  "cache_report": report}
        self._write_line(json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n")

    def _write_line(self, line: str) -> None:
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"request log {self.path} is closed")
            self._file.write(line)
            self._file.flush()
            self.num_written += 1

    def close(self) -> None:
        """Flush and close the file; later writes raise RuntimeError."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> RequestLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""StateFile: a small JSON document that outlives the process.

For what a client was promised: named-cache definitions and unexpired cache pins must survive a
restart (their KV is reloaded from a store or recomputed on first use). The file is rewritten
whole on every change, atomically (radixserve.atomic_file: temp file, fsync, rename, directory
fsync), so a ``kill -9`` or a power loss leaves the previous version or the new one, never a mix.

On disk the document is wrapped in an envelope naming its format and version:

    {"format": "radixserve-state", "version": 1, "saved_at": <unix seconds>, "data": {...}}

``load`` never raises for a bad file: a missing file is an empty state; an unreadable, corrupt or
foreign one (or one from a newer version) is logged, moved aside to ``<name>.corrupt`` so nothing
is lost for a human to inspect, and the state starts empty. Times inside ``data`` should be
wall-clock (``time.time()``): a monotonic clock restarts with the process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from radixserve.atomic_file import TEMP_SUFFIX, is_temp_file, write_atomically

log = logging.getLogger("radixserve.state")

STATE_FORMAT = "radixserve-state"
STATE_VERSION = 1


class StateFile:
    """Load and atomically save one JSON object at ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    @property
    def corrupt_path(self) -> Path:
        """Where a file that could not be loaded is moved."""
        return self.path.with_name(self.path.name + ".corrupt")

    def load(self) -> dict[str, Any]:
        """The saved object; {} if there is none or it cannot be trusted (logged, set aside).

        Also sweeps temp files an interrupted save left next to the file (one process owns it).
        """
        self._sweep_temp_files()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            log.info("state file %s does not exist yet: starting empty", self.path)
            return {}
        except OSError as exc:
            log.warning("state file %s is unreadable (%s): starting empty", self.path, exc)
            return {}
        try:
            envelope = json.loads(raw)
            if not isinstance(envelope, dict) or envelope.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} file")
            if envelope.get("version") != STATE_VERSION:
                raise ValueError(f"version {envelope.get('version')!r}, this server reads {STATE_VERSION}")
            data = envelope.get("data")
            if not isinstance(data, dict):
                raise ValueError("no data object")
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.set_aside(f"cannot be loaded ({exc})")
            return {}
        return data

    def save(self, data: dict[str, Any]) -> bool:
        """Replace the saved object with ``data`` (JSON-serialisable). Returns False if the write
        failed (logged; the previous file stays as it was). A value JSON cannot encode raises
        TypeError: that is a caller bug, not an I/O fault."""
        blob = json.dumps(
            {"format": STATE_FORMAT, "version": STATE_VERSION, "saved_at": time.time(), "data": data},
            separators=(",", ":"),
            sort_keys=True,
            allow_nan=False,
        ).encode("utf-8")
        with self._lock:  # saves land in call order
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # 0600: the state holds tenants' prompts (named caches' text)
                write_atomically(self.path, blob, durable_rename=True, mode=0o600)
            except OSError as exc:
                log.error("state file %s: save failed (%s); the previous state stays on disk", self.path, exc)
                return False
        return True

    def _sweep_temp_files(self) -> None:
        for leftover in self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"):
            if is_temp_file(leftover.name):
                try:
                    leftover.unlink()
                except OSError:
                    pass

    def set_aside(self, reason: str, outcome: str = "starting empty") -> None:
        """Move the file to ``corrupt_path`` (logged with ``reason``): for a file this class
        loaded but whose contents its owner could not use, so a human can still inspect it."""
        try:
            os.replace(self.path, self.corrupt_path)
            where = f"moved to {self.corrupt_path}"
        except OSError as exc:
            where = f"could not be moved aside: {exc}"
        log.warning("state file %s %s; %s; %s", self.path, reason, where, outcome)

"""What a client was promised outlives the process: named caches and cache_control pins.

With ``--state-dir PATH`` the server keeps ``PATH/server-state.json`` (radixserve/state_file.py:
temp file, fsync, rename, directory fsync, so ``kill -9`` at any moment leaves the previous
version or the new one) holding

  - every named cache: id, owner (the API key's hash, never the key), namespace, model, turns
    (the text; the tokens are re-rendered at start, with the tokenizer then loaded), times;
  - every live pin in the radix tree (cache_control breakpoints, and the pins of requests naming
    a named cache): its namespace, its tokens, its wall-clock expiry and its refresh (a read
    extends a cache_control pin to now + refresh). Pins are saved as the tree's pinned edges, so
    a prefix shared by several pins is written once and the tokens saved total the pinned blocks,
    which --max-pinned-fraction bounds.

When it is saved: a named cache created, updated or deleted is saved before the HTTP response
(a client that was told "created" finds it after any crash). Pins change on the engine thread
(applied with a request's first token, extended by reads, lapsed, released under memory
pressure, reset), so a finished request that pinned something marks the state dirty, and a saver
task writes dirty state at most once per ``state_save_interval``; it also re-reads the pins every
``state_refresh_interval`` to catch expiries moved by reads. A write happens only when the
document changed. Wall-clock times, because a monotonic clock restarts with the process.

At start (before the server listens) the file is read: expired entries are dropped; named caches
come back as records (same name, owner and expiry); pins saved by another model (a different
weights/tokenizer fingerprint or dtype: their tokens mean nothing now) are dropped, and so are
named caches of another served model name. A file that cannot be parsed is logged, moved aside
(``server-state.json.corrupt``) and the server starts empty; an entry that cannot be decoded is
skipped, logged, and the file is kept aside too. Then a background task recomputes the KV: one
``max_tokens=1`` request per named cache and per saved pin path (deepest pin first), one at a
time, so live traffic interleaves with it; each carries its pins, so the prefix is pinned again
for what is left of its lifetime. A request that arrives first just computes (and, naming a
cache or sending the same breakpoint, pins) the prefix itself. With a KV store configured those
warm-up requests load the blocks from it instead of prefilling them.

The state directory is locked (flock on ``PATH/lock``): a second server on it refuses to start.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radixserve.cache.radix_tree import PinnedEdge
from radixserve.request import CachePin, RequestOutput
from radixserve.sampling import SamplingParams
from radixserve.server.prompting import ChatTurn, build_prompt
from radixserve.state_file import StateFile

if TYPE_CHECKING:
    from radixserve.server.caches import NamedCache
    from radixserve.server.state import ServerState

log = logging.getLogger("radixserve.server")

STATE_FILE_NAME = "server-state.json"
LOCK_FILE_NAME = "lock"


class StateDirLockedError(RuntimeError):
    """Another process serves from this state directory."""


# ---- the document -------------------------------------------------------------------------------
def encode_tokens(token_ids: list[int]) -> str:
    """Token ids as base64 of little-endian u32 (about 5.3 bytes a token, any vocabulary)."""
    values = array.array("I", token_ids)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def decode_tokens(text: str) -> list[int]:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError("token bytes are not a whole number of u32")
    values = array.array("I")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


@dataclass(slots=True)
class SavedPin:
    """A pin to re-create: the first len(token_ids) tokens of `namespace`, until `expire_time`."""

    namespace: str
    token_ids: list[int]
    expire_time: float  # wall clock
    refresh: float
    above: int = -1  # index (in LoadedState.pins) of the nearest shorter live pin on its path; -1: none


@dataclass(slots=True)
class LoadedState:
    """What the state file held that is still worth re-creating."""

    named_caches: list[NamedCache] = field(default_factory=list)
    pins: list[SavedPin] = field(default_factory=list)
    dropped_expired: int = 0
    dropped_foreign: int = 0  # saved for another model
    bad_entries: int = 0  # could not be decoded


def encode_state(
    *, model: str, cache_identity: str, named_caches: list[NamedCache], edges: list[PinnedEdge], now: float
) -> dict[str, Any]:
    """The saved document. `edges` come from LLMEngine.pinned_paths (`until` in seconds from now).

    A named cache's own pin (fixed end, on exactly its tokens) is left out of the pins: the
    named cache re-creates it, and a deleted cache must not leave it behind."""
    edges = _without_named_cache_pins(edges, named_caches)
    return {
        "model": model,
        "cache_identity": cache_identity,
        "named_caches": [
            {
                "id": c.cache_id, "display_name": c.display_name, "model": c.model, "owner": c.owner,
                "namespace": c.namespace, "turns": [{"role": t.role, "blocks": list(t.blocks)} for t in c.turns],
                "create_time": c.create_time, "update_time": c.update_time, "expire_time": c.expire_time,
            }
            for c in named_caches
        ],
        "pin_edges": [
            {
                "namespace": e.namespace, "parent": e.parent, "tokens": encode_tokens(e.tokens),
                # whole seconds: re-reading unchanged pins (wall - monotonic jitter) gives the same bytes
                "expire_time": None if e.until is None else round(now + e.until), "refresh": e.refresh,
            }
            for e in edges
        ],
    }


def _without_named_cache_pins(edges: list[PinnedEdge], named_caches: list[NamedCache]) -> list[PinnedEdge]:
    """`edges` less the named caches' own pins, and less the edges then left on no pin's path."""
    owned = {(c.namespace, c.pinned_tokens) for c in named_caches if c.pinned_tokens}
    if not owned:
        return edges
    depth: list[int] = []
    kept = []
    for i, e in enumerate(edges):
        depth.append((depth[e.parent] if e.parent >= 0 else 0) + len(e.tokens))
        if e.until is not None and e.refresh == 0 and (e.namespace, depth[-1]) in owned \
                and _path(edges, i) in _named_prefixes(named_caches, e.namespace, depth[-1]):
            e = PinnedEdge(e.namespace, e.parent, e.tokens, None, 0.0)
        kept.append(e)
    on_a_path = [False] * len(kept)
    for i in range(len(kept) - 1, -1, -1):  # children come after their parents
        if kept[i].until is not None or on_a_path[i]:
            on_a_path[i] = True
            if kept[i].parent >= 0:
                on_a_path[kept[i].parent] = True
    index: dict[int, int] = {}
    out = []
    for i, e in enumerate(kept):
        if on_a_path[i]:
            index[i] = len(out)
            out.append(PinnedEdge(e.namespace, index[e.parent] if e.parent >= 0 else -1, e.tokens, e.until, e.refresh))
    return out


def _path(edges: list[PinnedEdge], i: int) -> list[int]:
    parts = []
    while i >= 0:
        parts.append(edges[i].tokens)
        i = edges[i].parent
    return [t for part in reversed(parts) for t in part]


def _named_prefixes(named_caches: list[NamedCache], namespace: str, n: int) -> list[list[int]]:
    return [c.token_ids[:n] for c in named_caches if c.namespace == namespace and c.pinned_tokens == n]


def decode_state(data: dict[str, Any], *, model: str, cache_identity: str, now: float, tokenizer) -> LoadedState:
    """The live entries of a saved document. Never raises for bad content: a bad entry is counted
    in `bad_entries` and skipped."""
    from radixserve.server.caches import NamedCache

    out = LoadedState()
    for entry in _list(data.get("named_caches"), out):
        try:
            turns = [ChatTurn(_str(t["role"]), [_str(b) for b in t["blocks"]]) for t in entry["turns"]]
            cache = NamedCache(
                cache_id=_str(entry["id"]), display_name=_str(entry["display_name"]), model=_str(entry["model"]),
                owner=_str(entry["owner"]), namespace=_str(entry["namespace"]), turns=turns, token_ids=[],
                create_time=_num(entry["create_time"]), update_time=_num(entry["update_time"]),
                expire_time=_num(entry["expire_time"]),
            )
            if not cache.cache_id or not turns:
                raise ValueError("no id or no turns")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("state file: skipping a named cache that cannot be decoded (%s)", exc)
            out.bad_entries += 1
            continue
        if cache.expire_time <= now:
            out.dropped_expired += 1
        elif cache.model != model:
            out.dropped_foreign += 1
        else:
            try:  # rendered again with the tokenizer loaded now (the text is what the client gave)
                cache.token_ids = build_prompt(tokenizer, turns, None, False).token_ids
            except Exception as exc:  # noqa: BLE001 - a bad saved entry must not stop the server starting
                log.warning("state file: skipping named cache %s, its turns cannot be rendered (%s)", cache.name, exc)
                out.bad_entries += 1
                continue
            out.named_caches.append(cache)

    edges = _list(data.get("pin_edges"), out)
    if edges and data.get("cache_identity") != cache_identity:
        out.dropped_foreign += sum(1 for e in edges if isinstance(e, dict) and e.get("expire_time") is not None)
        return out
    paths: list[tuple[str, list[int]] | None] = []  # per edge: namespace, tokens from the root
    pin_above: list[int] = []  # per edge: the nearest live pin on an edge above it (-1: none)
    pin_of_edge: dict[int, int] = {}
    for i, entry in enumerate(edges):
        try:
            parent = entry["parent"]
            if not isinstance(parent, int) or isinstance(parent, bool) or not -1 <= parent < i:
                raise ValueError(f"parent {parent!r} is not an earlier edge")
            namespace, tokens = _str(entry["namespace"]), decode_tokens(_str(entry["tokens"]))
            if parent >= 0:
                above = paths[parent]
                if above is None or above[0] != namespace:
                    raise ValueError("its parent edge was bad or in another namespace")
                tokens = above[1] + tokens
            expire = entry["expire_time"]
            expire = None if expire is None else _num(expire)
            refresh = _num(entry["refresh"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("state file: skipping a pin that cannot be decoded (%s)", exc)
            out.bad_entries += 1
            paths.append(None)
            pin_above.append(-1)
            continue
        paths.append((namespace, tokens))
        above = -1 if parent < 0 else pin_of_edge.get(parent, pin_above[parent])
        pin_above.append(above)
        if expire is None:
            continue
        if expire <= now:
            out.dropped_expired += 1
        else:
            pin_of_edge[i] = len(out.pins)
            out.pins.append(SavedPin(namespace, tokens, expire, refresh, above))
    return out


def _list(value: Any, out: LoadedState) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        out.bad_entries += 1
        return []
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


# ---- warm-up plan --------------------------------------------------------------------------------
@dataclass(slots=True)
class WarmRequest:
    """One warm-up request: compute `token_ids` in `namespace` and apply `pins` with its first token."""

    namespace: str
    token_ids: list[int]
    pins: list[SavedPin]


def plan_pin_warmup(pins: list[SavedPin]) -> list[WarmRequest]:
    """One request per deepest pin (no live pin below it), carrying that pin and every pin above
    it on its path (`SavedPin.above`). Longest first. O(pins x pins on a path)."""
    has_pin_below = {p.above for p in pins if p.above >= 0}
    plan = []
    for i, pin in enumerate(pins):
        if i in has_pin_below:
            continue
        chain, j = [], i
        while j >= 0:
            chain.append(pins[j])
            j = pins[j].above
        plan.append(WarmRequest(pin.namespace, pin.token_ids, chain))
    return sorted(plan, key=lambda w: -len(w.token_ids))


# ---- the keeper ----------------------------------------------------------------------------------
class StateKeeper:
    """Saves the server's promises to ``state_dir`` and re-creates them at start (module docs).

    Lifecycle (app.py's lifespan): ``restore()`` before the server listens, then ``start()``
    (warm-up and saver tasks), ``close()`` at shutdown (one last save). Routes call
    ``save_now()`` (named caches) and ``mark_dirty()`` (pins, reset)."""

    def __init__(self, state: ServerState, state_dir: str, *, save_interval: float = 1.0,
                 refresh_interval: float = 30.0, clock=time.time) -> None:
        self.state = state
        self.dir = Path(state_dir)
        self.file = StateFile(self.dir / STATE_FILE_NAME)
        self.save_interval = save_interval
        self.refresh_interval = refresh_interval
        self.clock = clock
        self._lock_fd: int | None = None
        self._dirty = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self._last_saved: bytes | None = None
        self._warm_plan: list[WarmRequest] = []
        self._restored_caches: list[NamedCache] = []
        self._tasks: list[asyncio.Task] = []
        self.warm_done = asyncio.Event()

    # ---- start ---------------------------------------------------------------------------------
    def restore(self) -> LoadedState:
        """Lock the directory, read the file and re-create the named-cache records (their KV comes
        back with the warm-up). Raises StateDirLockedError if another process holds the lock."""
        self._acquire_lock()
        state = self.state
        data = self.file.load()
        loaded = decode_state(data, model=state.model_name, cache_identity=state.engine_info.cache_identity,
                              now=self.clock(), tokenizer=state.tokenizer)
        if loaded.bad_entries:
            self.file.set_aside(f"has {loaded.bad_entries} entries that cannot be decoded",
                                outcome="starting with the entries that could be")
        for cache in loaded.named_caches:
            cache.pinned_tokens = 0  # nothing is cached yet; the warm-up (or a first use) pins it
            state.caches.adopt(cache)
        for pin in loaded.pins:  # a pin of a request naming a cache is that cache's to lift on delete
            for cache in loaded.named_caches:
                n = len(pin.token_ids)
                if cache.namespace == pin.namespace and cache.token_ids[:n] == pin.token_ids:
                    cache.request_pin_tokens.add(n)
        if state.prefix_caching:
            self._restored_caches = list(loaded.named_caches)
            self._warm_plan = plan_pin_warmup(loaded.pins)
        if data:
            log.info(
                "state %s: restored %d named caches and %d pins (%d warm-up requests); dropped %d expired, %d saved "
                "by another model, %d undecodable", self.file.path, len(loaded.named_caches), len(loaded.pins),
                len(self._restored_caches) + len(self._warm_plan), loaded.dropped_expired, loaded.dropped_foreign,
                loaded.bad_entries,
            )
        return loaded

    def start(self) -> None:
        """The warm-up and saver tasks (inside the running event loop, engine started)."""
        self._tasks = [asyncio.create_task(self._warm_up()), asyncio.create_task(self._run_saver())]

    async def close(self) -> None:
        """Stop the tasks and save once more (the engine must still run, to read the pins)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.save_now()
        self._release_lock()

    # ---- saving --------------------------------------------------------------------------------
    def mark_dirty(self) -> None:
        self._dirty.set()

    def on_finished(self, out: RequestOutput) -> None:
        """AsyncEngine's hook: a request that pinned something changed the pins."""
        if out.num_pinned_tokens > 0:
            self._dirty.set()

    async def save_now(self) -> bool:
        """Snapshot and write now (if anything changed). Returns False if the write failed."""
        async with self._save_lock:
            self._dirty.clear()
            state = self.state
            edges: list[PinnedEdge] = []
            if state.prefix_caching and not state.async_engine.is_running:
                # the engine died (its process exited): the file keeps the pins it last saw,
                # which a restarted server re-creates, rather than an empty list
                return True
            if state.prefix_caching:
                edges = await state.async_engine.pinned_paths()
            now = self.clock()
            document = encode_state(model=state.model_name, cache_identity=state.engine_info.cache_identity,
                                    named_caches=state.caches.live(), edges=edges, now=now)
            blob = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
            if blob == self._last_saved:
                return True
            ok = await asyncio.to_thread(self.file.save, document)
            if ok:
                self._last_saved = blob
            return ok

    async def _run_saver(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=self.refresh_interval)
            try:
                await self.save_now()
            except Exception:  # noqa: BLE001 - keep saving later; the engine may be stopping
                log.exception("saving the server state failed")
            await asyncio.sleep(self.save_interval)  # coalesce a burst of changes into one write

    # ---- warm-up -------------------------------------------------------------------------------
    async def _warm_up(self) -> None:
        started = time.monotonic()
        try:
            for cache in self._restored_caches:
                await self._warm_named_cache(cache)
            for item in self._warm_plan:
                await self._warm_pins(item)
        finally:
            if self._restored_caches or self._warm_plan:
                log.info("state: warm-up of %d named caches and %d pin paths done in %.1f s",
                         len(self._restored_caches), len(self._warm_plan), time.monotonic() - started)
                self.mark_dirty()
            self.warm_done.set()

    async def _warm_named_cache(self, cache: NamedCache) -> None:
        try:
            await self.state.caches.warm(cache)
        except Exception as exc:  # noqa: BLE001 - one cache failing to warm must not stop the rest
            log.warning("state: recomputing named cache %s failed (%s); it is computed on first use", cache.name, exc)

    async def _warm_pins(self, item: WarmRequest) -> None:
        from radixserve.server.state import collect

        now = self.clock()
        pins = [CachePin(len(p.token_ids), p.expire_time - now, refresh=p.refresh)
                for p in item.pins if p.expire_time > now]
        if not pins:
            return
        try:
            stream = await self.state.submit(item.token_ids, SamplingParams(max_tokens=1, temperature=0.0),
                                             prefix="warm-", namespace=item.namespace, cache_pins=pins)
            out = await collect(stream)
        except Exception as exc:  # noqa: BLE001
            log.warning("state: recomputing a pinned prefix of %d tokens failed (%s)", len(item.token_ids), exc)
            return
        if out.num_pinned_tokens < max(p.num_tokens for p in pins):
            log.warning("state: a restored pin of %d tokens was refused (the pin bounds are full)",
                        max(p.num_tokens for p in pins))

    # ---- the directory lock -----------------------------------------------------------------
    def _acquire_lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateDirLockedError(f"the state directory {self.dir} is in use by another server") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


class NoStateKeeper:
    """No --state-dir: the same calls, nothing kept (a restart starts empty)."""

    warm_done: asyncio.Event | None = None

    def restore(self) -> LoadedState:
        return LoadedState()

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def mark_dirty(self) -> None:
        pass

    def on_finished(self, out: RequestOutput) -> None:
        pass

    async def save_now(self) -> bool:
        return True

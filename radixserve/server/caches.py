"""Named caches (after Gemini's cachedContents): a conversation prefix kept pinned until it expires.

Creating one runs its turns through the engine (a one-token request) so their KV lands in the
prefix cache, then pins that path of the radix tree until the expire time. A chat or messages
request naming the cache gets the cache's turns prepended; its prompt then starts with exactly
the cache's tokens, so the engine reads them from the tree. Every such request also re-pins the
prefix (CachePin), which restores the cache after an admin reset dropped its blocks.
Expired or deleted caches are unpinned; the tree may then evict their blocks like any others.

Times: records keep wall-clock seconds (what the API shows); the radix tree's pins use the
engine's monotonic clock, so a pin is always given as "remaining seconds".
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from radixserve.errors import NotFoundError
from radixserve.request import CachePin
from radixserve.sampling import SamplingParams
from radixserve.sequences import common_prefix_len
from radixserve.server.errors import APIError
from radixserve.server.prompting import ChatPrompt, ChatTurn, build_prompt

if TYPE_CHECKING:
    from fastapi import Request

    from radixserve.server.state import ServerState

log = logging.getLogger("radixserve.server")

_DURATION = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,9})?)s\s*$")
# The longest lifetime a named cache may ask for. Longer ones are refused (400) before anything
# is stored: a lifetime must stay a representable date, and pins are bounded anyway.
MAX_TTL = 10 * 365 * 86400.0


@dataclass(slots=True)
class NamedCache:
    cache_id: str
    display_name: str
    model: str
    owner: str  # the tenant's key namespace: only the owner sees the cache
    namespace: str  # the prefix-cache namespace its KV lives in
    turns: list[ChatTurn]
    token_ids: list[int]  # the turns rendered without a generation prompt, tokenized
    create_time: float
    update_time: float
    expire_time: float
    pinned_tokens: int = 0  # how many of token_ids the tree pin covers (whole blocks)
    request_pin_tokens: set[int] = field(default_factory=set)  # prefixes requests naming it pinned

    @property
    def name(self) -> str:
        return f"caches/{self.cache_id}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "model": self.model,
            "create_time": rfc3339(self.create_time),
            "update_time": rfc3339(self.update_time),
            "expire_time": rfc3339(self.expire_time),
            "usage_metadata": {"total_token_count": len(self.token_ids)},
        }


class CacheRegistry:
    """Where named-cache definitions are shared with other servers: nowhere (one server).

    Scale-out replaces it (cluster/shared_state.py) so that a cache created through one replica
    is usable through every replica: each replica adopts the definition on first use and builds
    its own pin as requests naming it run."""

    shared = False

    async def save(self, cache: NamedCache) -> None:
        pass

    async def load(self, cache_id: str) -> NamedCache | None:
        return None

    async def delete(self, cache_id: str) -> None:
        pass

    async def list(self, owner: str) -> list[NamedCache]:
        return []


class NamedCacheStore:
    """The named caches of one server. All methods run on the event loop."""

    def __init__(self, state: ServerState, clock=time.time, registry: CacheRegistry | None = None) -> None:
        self.state = state
        self.clock = clock
        self.registry = registry or CacheRegistry()
        self._caches: dict[str, NamedCache] = {}

    def __len__(self) -> int:
        return len(self._caches)

    # ---- CRUD -------------------------------------------------------------------------
    async def create(
        self, *, owner: str, namespace: str, model: str, display_name: str, turns: list[ChatTurn],
        ttl: float | None = None, expire_time: float | None = None, http_request: Request | None = None,
    ) -> NamedCache:
        """Prefill `turns` and pin them until `expire_time`, or for `ttl` seconds counted from
        when the cache is ready (prefilling a long prefix can take a while on a CPU). The
        prefill is aborted if the client of `http_request` disconnects meanwhile."""
        if (ttl is None) == (expire_time is None):
            raise ValueError("give exactly one of ttl and expire_time")
        from radixserve.server.state import collect  # state imports this module

        state = self.state
        if not state.prefix_caching:
            raise APIError(400, "named caches need the prefix cache, and this server runs with --no-prefix-caching")
        self._check_room()
        if not turns:
            raise APIError(400, "a cache needs a system instruction or at least one message", param="messages")
        state.check_prompt_size([block for turn in turns for block in turn.blocks])
        prompt = await asyncio.to_thread(build_prompt, state.tokenizer, turns, None, False)  # off the event loop
        token_ids = prompt.token_ids
        state.check_prompt_tokens(len(token_ids))
        minimum = max(state.config.min_cacheable_tokens, state.block_size)
        if len(token_ids) < minimum:
            raise APIError(
                400,
                f"the cached content is too small: {len(token_ids)} tokens, the minimum is {minimum}",
                param="messages",
            )
        blocks = len(token_ids) // state.block_size
        bound = state.pin_bounds()
        if bound is not None and blocks > min(bound):
            raise APIError(
                400, f"the cached content is too large to pin: {blocks} KV blocks, but pins may hold at most "
                     f"{bound[1]} blocks per namespace and {bound[0]} in total ({state.pin_bounds_text()})",
                param="messages",
            )
        pin_ttl = ttl if ttl is not None else expire_time - self.clock()
        # Prefill it (one output token, thrown away); the pin keeps it cached after the
        # request finishes, before anything else can evict it.
        stream = await state.submit(
            token_ids, SamplingParams(max_tokens=1, temperature=0.0), prefix="cache-", namespace=namespace,
            cache_pins=[CachePin(len(token_ids), pin_ttl)],
        )
        out = await collect(stream, http_request)
        if out.finish_reason == "abort":
            raise APIError(503, "creating the cache was interrupted")
        now = self.clock()
        expires = expire_time if expire_time is not None else now + ttl
        if expires <= now:
            raise APIError(400, "expire_time passed while the cache was being created", param="expire_time")
        cache = NamedCache(
            cache_id=uuid.uuid4().hex[:20], display_name=display_name, model=model, owner=owner,
            namespace=namespace, turns=turns, token_ids=token_ids, create_time=now, update_time=now,
            expire_time=expires,
        )
        cache.pinned_tokens = len(token_ids)  # what the request pinned (in whole blocks)
        await self._set_pin(cache)
        if cache.pinned_tokens == 0:  # refused: the pins already held leave no room under the bounds
            raise APIError(
                429, f"the cache was not stored: pinning its {blocks} KV blocks would exceed what pins may hold "
                     f"({state.pin_bounds_text()}); delete or let expire another cache, or retry later",
            )
        self._caches[cache.cache_id] = cache
        await self.registry.save(cache)
        await state.keeper.save_now()  # on disk before the client hears "created" (--state-dir)
        return cache

    def _check_room(self) -> None:
        limit = self.state.config.max_named_caches
        if len(self._caches) >= limit:
            raise APIError(429, f"this server holds {limit} named caches, its limit (--max-named-caches); delete "
                                "one or let one expire, or retry later")

    def adopt(self, cache: NamedCache) -> None:
        """Take over a cache restored from the saved state (radixserve/server/persistence.py):
        same id, owner and expiry; its KV is recomputed by `warm` or on first use."""
        self._caches[cache.cache_id] = cache

    async def warm(self, cache: NamedCache) -> None:
        """Recompute a restored cache's KV and pin it again until its expiry, as `create` does."""
        from radixserve.server.state import collect  # state imports this module

        remaining = cache.expire_time - self.clock()
        if not self._is_live(cache) or remaining <= 0:
            return
        stream = await self.state.submit(
            cache.token_ids, SamplingParams(max_tokens=1, temperature=0.0), prefix="cache-warm-",
            namespace=cache.namespace,
            cache_pins=[CachePin(len(cache.token_ids), remaining, alive=lambda: self._is_live(cache), owner=cache.cache_id)],
        )
        out = await collect(stream)
        if out.finish_reason == "abort" or not self._is_live(cache):
            return
        cache.pinned_tokens = max(cache.pinned_tokens, out.num_pinned_tokens)
        if cache.pinned_tokens:
            await self._set_pin(cache)

    def live(self) -> list[NamedCache]:
        """Every unexpired cache (what the saved state holds)."""
        now = self.clock()
        return [c for c in self._caches.values() if c.expire_time > now]

    async def get(self, owner: str, name: str) -> NamedCache:
        """The live cache called `name` ("caches/<id>" or "<id>"); NotFoundError otherwise."""
        cache_id = name.removeprefix("caches/")
        cache = self._caches.get(cache_id)
        if self.registry.shared:
            cache = await self._sync_from_registry(cache_id, cache)
        if cache is None or cache.owner != owner:
            raise NotFoundError(f"cached content {name!r} was not found (it may have expired or been deleted)")
        if cache.expire_time <= self.clock():
            await self._drop(cache)
            raise NotFoundError(f"cached content {name!r} has expired")
        return cache

    def list(self, owner: str) -> list[NamedCache]:
        now = self.clock()
        live = [c for c in self._caches.values() if c.owner == owner and c.expire_time > now]
        return sorted(live, key=lambda c: c.create_time)

    async def list_all(self, owner: str) -> list[NamedCache]:
        """`list`, over every server sharing the registry."""
        if not self.registry.shared:
            return self.list(owner)
        now = self.clock()
        live = [c for c in await self.registry.list(owner) if c.expire_time > now]
        return sorted(live, key=lambda c: c.create_time)

    async def _sync_from_registry(self, cache_id: str, local: NamedCache | None) -> NamedCache | None:
        """The registry is the truth: adopt a cache created elsewhere, follow a lifetime changed
        elsewhere, drop one deleted elsewhere."""
        shared = await self.registry.load(cache_id)
        if shared is None:
            if local is not None:
                await self._drop(local)
            return None
        if local is None:  # created through another replica: its KV is pinned here as requests use it
            shared.pinned_tokens = 0
            shared.request_pin_tokens = set()
            self._caches[cache_id] = local = shared
        elif shared.expire_time != local.expire_time:
            local.expire_time, local.update_time = shared.expire_time, shared.update_time
            if local.pinned_tokens:
                await self._set_pin(local)
        return local

    async def update(self, owner: str, name: str, expire_time: float) -> NamedCache:
        cache = await self.get(owner, name)
        cache.expire_time = expire_time
        cache.update_time = self.clock()
        # The tree only ever extends a pin, so a shorter TTL needs unpin + pin; both run in one
        # engine call so no step (and no eviction) can happen in between.
        await self._set_pin(cache)
        await self.registry.save(cache)
        await self.state.keeper.save_now()
        return cache

    async def delete(self, owner: str, name: str) -> None:
        cache = await self.get(owner, name)
        await self._drop(cache)
        await self.state.keeper.save_now()

    # ---- use by requests ----------------------------------------------------------------
    def request_pin(self, cache: NamedCache, prompt: ChatPrompt) -> CachePin | None:
        """The pin a request naming `cache` carries: its shared prefix with the cache's tokens,
        in whole blocks, for the cache's remaining lifetime."""
        shared = common_prefix_len(cache.token_ids, prompt.token_ids)
        shared -= shared % self.state.block_size
        remaining = cache.expire_time - self.clock()
        if shared <= 0 or remaining <= 0:
            return None
        cache.pinned_tokens = max(cache.pinned_tokens, shared)
        cache.request_pin_tokens.add(shared)
        # `alive` closes the race with delete and expiry: the engine applies this pin only if
        # the cache is still live by then (_drop removes the record before it unpins).
        return CachePin(shared, remaining, alive=lambda: self._is_live(cache), owner=cache.cache_id)

    def _is_live(self, cache: NamedCache) -> bool:
        """Called on the engine thread: a dict lookup and a float compare, safe under the GIL."""
        return self._caches.get(cache.cache_id) is cache and cache.expire_time > self.clock()

    # ---- expiry -----------------------------------------------------------------------
    async def sweep(self) -> int:
        """Unpin and forget every expired cache. Returns how many went."""
        now = self.clock()
        expired = [c for c in self._caches.values() if c.expire_time <= now]
        for cache in expired:
            await self._drop(cache)
        if expired:
            self.state.keeper.mark_dirty()
        return len(expired)

    async def run_sweeper(self, interval: float) -> None:
        """Sweep forever (a background task of the app)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - keep sweeping; the engine may be stopping
                log.exception("sweeping expired named caches failed")

    async def _set_pin(self, cache: NamedCache) -> None:
        """Make the tree pin of `cache` end exactly at its expire time. The tree only ever
        extends a pin, so this is unpin + pin, in one engine call (no step, hence no eviction,
        in between). Identical caches share one tree node: it keeps the latest expiry of all."""
        until = max([cache.expire_time] + [c.expire_time for c in self._twins(cache)])
        cache.pinned_tokens = await self.state.async_engine.repin(
            cache.token_ids, cache.pinned_tokens, until - self.clock(), cache.namespace
        )

    async def _drop(self, cache: NamedCache) -> None:
        """Forget `cache` and unpin every prefix it or a request naming it pinned. The record
        goes first, so a request still prefilling cannot re-apply its pin afterwards (its
        CachePin asks `_is_live`); unpin and the twin's re-pin run in one engine call."""
        if self._caches.pop(cache.cache_id, None) is None:
            return
        await self.registry.delete(cache.cache_id)
        self.state.async_engine.forget_pin_owner(cache.cache_id)
        lengths = sorted({n for n in (cache.pinned_tokens, *cache.request_pin_tokens) if n > 0})
        if not lengths or not self.state.async_engine.is_running:
            return
        twins = self._twins(cache)
        keep = max(twins, key=lambda c: c.expire_time) if twins else None  # the node stays pinned for it
        until = keep.expire_time - self.clock() if keep is not None else 0.0
        pinned = await self.state.async_engine.unpin_all(
            cache.token_ids, lengths, cache.namespace,
            keep.token_ids if keep is not None else None, keep.pinned_tokens if keep is not None else 0, until,
        )
        if keep is not None:
            keep.pinned_tokens = pinned

    def _twins(self, cache: NamedCache) -> list[NamedCache]:
        """Other live caches whose pin sits on the same tree node as `cache`'s."""
        prefix = cache.token_ids[: cache.pinned_tokens]
        return [
            c for c in self._caches.values()
            if c is not cache and c.namespace == cache.namespace and c.token_ids[: c.pinned_tokens] == prefix
        ]


# ---- times ------------------------------------------------------------------------------
def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_ttl(value: str | float | int) -> float:
    """A Duration: "300s", "1.5s", or a number of seconds. Positive, finite, at most MAX_TTL."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise APIError(400, f"ttl must be a duration like \"300s\", got {value!r}", param="ttl")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
    else:
        match = _DURATION.match(value)
        if match is None:
            raise APIError(400, f"ttl must be a duration like \"300s\", got {value[:40]!r}", param="ttl")
        seconds = float(match.group(1))
    if not math.isfinite(seconds) or not seconds > 0:
        raise APIError(400, f"ttl must be a positive number of seconds, got {_show(value)}", param="ttl")
    if seconds > MAX_TTL:
        raise APIError(400, f"ttl must be at most {MAX_TTL:.0f}s (10 years), got {_show(value)}", param="ttl")
    return seconds


def _show(value: str | float | int) -> str:
    if isinstance(value, int) and not -10**20 < value < 10**20:
        return "a number too large"  # str() of a huge int may itself fail
    return str(value)[:40]


def parse_expire_time(value: str, now: float) -> float:
    """An RFC 3339 timestamp in the future, as epoch seconds (naive times are UTC)."""
    try:
        when = datetime.fromisoformat(value.strip())
        seconds = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        raise APIError(
            400, f"expire_time must be an RFC 3339 timestamp like \"2030-01-01T00:00:00Z\", got {value!r}",
            param="expire_time",
        ) from None
    if seconds <= now:
        raise APIError(400, f"expire_time {value!r} is in the past", param="expire_time")
    if seconds - now > MAX_TTL:
        raise APIError(400, f"expire_time may be at most {MAX_TTL:.0f}s (10 years) away, got {value!r}",
                       param="expire_time")
    return seconds


def parse_lifetime(
    ttl: str | float | int | None, expire_time: str | None, now: float, default_ttl: float
) -> tuple[float | None, float | None]:
    """(ttl seconds, None) or (None, expire epoch seconds) from a request's ttl / expire_time."""
    if ttl is not None and expire_time is not None:
        raise APIError(400, "give either ttl or expire_time, not both", param="ttl")
    if expire_time is not None:
        return None, parse_expire_time(expire_time, now)
    return (parse_ttl(ttl) if ttl is not None else default_ttl), None

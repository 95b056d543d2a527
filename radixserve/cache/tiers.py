"""The lower tiers of the prefix cache, as the cache manager sees them: bookkeeping only.

Below the device pool (the radix tree) a block can live in host RAM (GPU only) and in a storage
tier (a KVStore: disk, Redis, memory), addressed by its content key (cache/block_keys.py). The
manager decides *what* moves; the tensor side (radixserve/tier_io.py, beside the runner) moves
it. Between the two sits one plain record per step, `TierTransfers`:

    write_back  (block_id, key): blocks the tree just evicted, to copy one tier down (host RAM
                if there is one, else storage). Copied before the step's loads and forward, so
                a block freed by eviction is still intact when copied, even if reallocated.
    write_through (block_id, key): blocks of a prefix just pinned, to copy to storage now (a
                restart or another replica then finds them); they stay on the device too.
    host_loads  (block_id, key): freshly allocated pool blocks to fill from host RAM.
    store_loads (block_id, record): the same from verified storage records (read in the
                background while the request waited, cache/prefetch.py, and taken at
                admission, so a corrupt record shortens the match there, before the step's
                token positions are fixed).

`LoadCostModel` decides load or recompute per request from measured rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from radixserve.cache.block_keys import BlockKey, BlockKeyChain
from radixserve.cache.kv_store import KVRecord

TIERS = ("device", "host", "storage")


class KeyIndex(Protocol):
    """What the manager asks a lower tier at admission: does it hold these blocks?"""

    def contains(self, keys: Sequence[BlockKey]) -> list[bool]: ...


@dataclass(slots=True)
class StorageProbe:
    """What `KVCacheManager.loading()` learnt of a waiting request, reused by its admission so
    that a request hashes its prompt once and asks the store `contains` once:

        0 ... device match ... host run ... start ...... start + held ...... limit
                                            |<- the store's run ->|

    keys: the content keys of its cacheable prompt blocks.
    start, held: the store held blocks start .. start + held - 1 when asked (their records are
    prefetched when loading them pays). A block written to the store between loading() and
    admission is not seen: it is prefilled, slower, never wrong.
    """

    keys: BlockKeyChain
    start: int
    held: int

    def run_from(self, block: int) -> int | None:
        """How many blocks from block number `block` the store held; None where the probe did
        not ask (the device match moved past its run or back before it): ask the store."""
        if self.start <= block <= self.start + self.held:
            return self.start + self.held - block
        return None


@dataclass(slots=True)
class TierTransfers:
    """One step's block copies between the device pool and the lower tiers (see module doc)."""

    write_back: list[tuple[int, BlockKey]] = field(default_factory=list)
    write_through: list[tuple[int, BlockKey]] = field(default_factory=list)
    host_loads: list[tuple[int, BlockKey]] = field(default_factory=list)
    store_loads: list[tuple[int, KVRecord]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.write_back or self.write_through or self.host_loads or self.store_loads)


@dataclass(slots=True)
class TierStats:
    """Monotonic counters of the tiers (for /metrics)."""

    hit_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    hit_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    load_decisions: int = 0  # admissions that found blocks below the device and loaded them
    recompute_decisions: int = 0  # ... and recomputed them because loading was predicted slower
    saved_blocks: int = 0  # blocks listed to copy down (write-back on eviction, write-through on pin)
    short_loads: int = 0  # loads cut short: a record listed by contains was missing or corrupt
    prefetched_blocks: int = 0  # storage blocks read in the background before admission (cache/prefetch.py)


@dataclass(slots=True)
class LoadCostModel:
    """Load or recompute: predicted seconds to read `nbytes` from a tier vs to prefill the
    tokens they hold, both from exponentially weighted measurements.

    Prefill time is taken as linear in the tokens at the measured rate of large prefill steps:
    attention's quadratic part makes long contexts slower still, so the linear model leans
    towards recompute for long prefixes, the safe side. The defaults are conservative (slow
    reads, fast prefill); the first observations replace them quickly (weight `alpha`).
    """

    read_bytes_per_s: dict[str, float] = field(default_factory=lambda: {"host": 5e9, "storage": 2e8})
    prefill_tokens_per_s: float = 2000.0
    alpha: float = 0.3
    min_prefill_sample_tokens: int = 64  # smaller steps measure launch overhead, not the rate
    # A tier judged slower is never read, so its estimate would never improve: one recompute
    # decision in `explore_every` loads anyway (a bounded cost) to measure it again.
    explore_every: int = 64
    _recomputes: dict[str, int] = field(default_factory=dict)

    def predicted_load_s(self, tier: str, nbytes: int) -> float:
        return nbytes / self.read_bytes_per_s[tier]

    def predicted_prefill_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s

    def should_load(self, tier: str, num_tokens: int, nbytes: int) -> bool:
        if self.predicted_load_s(tier, nbytes) < self.predicted_prefill_s(num_tokens):
            return True
        self._recomputes[tier] = self._recomputes.get(tier, 0) + 1
        return self.explore_every > 0 and self._recomputes[tier] % self.explore_every == 0

    def observe_read(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            old = self.read_bytes_per_s[tier]
            self.read_bytes_per_s[tier] = old + self.alpha * (nbytes / seconds - old)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens >= self.min_prefill_sample_tokens and seconds > 0:
            old = self.prefill_tokens_per_s
            self.prefill_tokens_per_s = old + self.alpha * (num_tokens / seconds - old)

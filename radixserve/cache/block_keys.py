"""Content keys for KV blocks: a sha256 hash chain over token blocks.

A block's KV depends on every token before it (attention is causal over the whole prefix), on
the weights, the precision, how the KV is laid out, and on the tenant's cache namespace. So a
full block's key is

    key(block i) = sha256(BLOCK_TAG || key(block i-1) || u32 count || count x u32 token ids)
    key(block -1) = root = sha256(ROOT_TAG || identity fields || namespace)

with every variable-length field length-prefixed and every token a fixed-width little-endian
u32, so two different inputs never serialise to the same bytes. Keys are plain bytes (32), stable
across processes, machines and restarts (no Python ``hash()``, no per-process salt), which is
what lets a storage tier, a restarted server or another replica answer "do you hold this
block?". Extending a chain by one block is one sha256 over ~100 bytes, so keys are computed
incrementally as blocks fill.

Why sha256: a key is trusted as a proof of content (a hit is served without comparing tokens), so
an adversarial tenant must not be able to craft two prefixes with the same key. sha256 makes that
infeasible; vLLM defaults to sha256 block hashes for the same reason. ``hashlib.sha256`` is
OpenSSL's (SHA-NI on current CPUs), far below a block's prefill cost.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

# Bump when the bytes of a stored block change meaning (the runner's per-block layout, the
# record payload order) so that keys computed by older code never match newer records.
KV_LAYOUT_VERSION = 1

KEY_SIZE = 32  # bytes of a BlockKey (sha256 digest)
MAX_TOKEN_ID = 2**32 - 1  # token ids are encoded as fixed-width u32

BlockKey = NewType("BlockKey", bytes)

# Domain tags: a root and a block key are hashes of differently tagged inputs, so no chain can
# be made to start from another chain's block, and the encoding can evolve under a new tag.
_ROOT_TAG = b"radixserve/kv-root/v1\x00"
_BLOCK_TAG = b"radixserve/kv-block/v1\x00"


def _str_field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


@dataclass(frozen=True, slots=True)
class CacheIdentity:
    """Everything besides the tokens and the namespace that changes a block's KV bytes.

    model: ``LoadedModel.cache_identity`` ("<model_id>@<weights+tokenizer fingerprint>/<dtype>").
    block_size: tokens per block (a block's KV covers exactly this many positions).
    kv_layout_version: KV_LAYOUT_VERSION of the code that computed the KV.
    """

    model: str
    block_size: int
    kv_layout_version: int = KV_LAYOUT_VERSION

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("CacheIdentity.model must name the model (LoadedModel.cache_identity)")
        if not 0 < self.block_size <= MAX_TOKEN_ID:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.kv_layout_version <= MAX_TOKEN_ID:
            raise ValueError(f"kv_layout_version out of range: {self.kv_layout_version}")

    def describe(self) -> str:
        """One readable line, stored in record headers and checked on load."""
        return f"{self.model};block_size={self.block_size};kv_layout={self.kv_layout_version}"


def root_key(identity: CacheIdentity, namespace: str) -> BlockKey:
    """The key the first block of every prefix in (identity, namespace) chains from."""
    data = b"".join(
        (
            _ROOT_TAG,
            _str_field(identity.model),
            struct.pack("<II", identity.block_size, identity.kv_layout_version),
            _str_field(namespace),
        )
    )
    return BlockKey(hashlib.sha256(data).digest())


def block_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    """Key of the block holding ``token_ids`` right after the block (or root) keyed ``parent``.

    Callers pass exactly one full block of tokens; the count is encoded anyway, so the encoding
    never depends on the block size being right.
    """
    if len(parent) != KEY_SIZE:
        raise ValueError(f"parent key must be {KEY_SIZE} bytes, got {len(parent)}")
    try:
        packed = struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids)
    except struct.error:
        bad = next((t for t in token_ids if not (isinstance(t, int) and 0 <= t <= MAX_TOKEN_ID)), None)
        raise ValueError(f"token ids must be ints in [0, 2**32), got {bad!r}") from None
    return BlockKey(hashlib.sha256(_BLOCK_TAG + parent + packed).digest())


def chain_keys(parent: BlockKey, token_ids: Sequence[int], block_size: int) -> list[BlockKey]:
    """Keys of the full blocks of ``token_ids``, chained from ``parent``.

    ``token_ids`` start at a block boundary (right after ``parent``'s block); a trailing partial
    block gets no key (only full blocks are ever shared). To extend a chain later, pass the last
    key returned here as ``parent`` and the tokens after it.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    keys: list[BlockKey] = []
    key = parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        key = block_key(key, token_ids[start : start + block_size])
        keys.append(key)
    return keys


def prefix_keys(identity: CacheIdentity, namespace: str, token_ids: Sequence[int]) -> list[BlockKey]:
    """Keys of every full block of a prompt, from the root of (identity, namespace)."""
    return chain_keys(root_key(identity, namespace), token_ids, identity.block_size)


class BlockKeyChain:
    """The keys of one growing sequence (a request's prompt + output), extended as blocks fill.

    ``update`` is given the whole sequence so far and keys only the blocks that became full since
    the last call, so a request pays one sha256 per block over its lifetime. The sequence must
    only grow (tokens already keyed never change), which holds for a request's token ids.
    """

    __slots__ = ("identity", "namespace", "keys")

    def __init__(self, identity: CacheIdentity, namespace: str) -> None:
        self.identity = identity
        self.namespace = namespace
        self.keys: list[BlockKey] = []

    def copy(self) -> BlockKeyChain:
        """An independent chain with the same keys so far (a forked sequence: n > 1 choices)."""
        chain = BlockKeyChain(self.identity, self.namespace)
        chain.keys = list(self.keys)
        return chain

    def update(self, token_ids: Sequence[int]) -> list[BlockKey]:
        """Key the newly full blocks of ``token_ids``; returns just those new keys."""
        block_size = self.identity.block_size
        start = len(self.keys) * block_size
        parent = self.keys[-1] if self.keys else root_key(self.identity, self.namespace)
        new = chain_keys(parent, token_ids[start:], block_size)
        self.keys.extend(new)
        return new

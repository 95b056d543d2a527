"""Between the runner's KV tensors and storage records (the tensor side of the tiers).

The cache layer keys, stores and verifies blocks as bytes (cache/kv_store.py) and never touches
a tensor; the runner owns the KV pool. This module is the one place that turns blocks of the pool
into ``KVRecord``s and back, so it sits next to the runner, not in cache/.

A block's payload is every layer's K and V for that block, C order, in the pool's dtype:

    [num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]

i.e. ``KVCache.storage[:, :, block_id]``. The bytes are the pool's bytes, so a block loaded back
is bitwise the block that was saved (on GPU too: the copy is raw, no dtype conversion). Changing
this order or shape means bumping ``KV_LAYOUT_VERSION`` (cache/block_keys.py), which changes
every key, so old records simply stop matching.

Copies here are synchronous and batched per call (one gather, one device->host copy); the
host-RAM tier's pinned buffers and copy stream are a later step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radixserve.cache.block_keys import BlockKey
from radixserve.cache.kv_store import KVLayout, KVRecord
from radixserve.model.attention import KVCache


class KVLayoutMismatchError(ValueError):
    """A record's layout differs from the pool it would be loaded into."""


def _storage(kv_cache: KVCache) -> torch.Tensor:
    """The pool as one [num_layers, 2, num_blocks, block_size, kv_heads, head_dim] tensor."""
    if kv_cache.storage is None:
        raise ValueError("block transfer needs a KVCache allocated as one storage tensor (KVCache.allocate)")
    return kv_cache.storage


def block_layout(kv_cache: KVCache) -> KVLayout:
    """The layout of one block of ``kv_cache`` as a record payload."""
    key_cache = kv_cache.key_caches[0]
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    return KVLayout(
        dtype=str(key_cache.dtype).removeprefix("torch."),
        shape=(kv_cache.num_layers, 2, block_size, num_kv_heads, head_dim),
    )


def blocks_to_records(
    kv_cache: KVCache, block_ids: Sequence[int], keys: Sequence[BlockKey], identity: str
) -> list[KVRecord]:
    """Records of the given pool blocks: block ``block_ids[i]`` stored under ``keys[i]``."""
    if len(block_ids) != len(keys):
        raise ValueError(f"{len(block_ids)} blocks but {len(keys)} keys")
    if not block_ids:
        return []
    layout = block_layout(kv_cache)
    storage = _storage(kv_cache)
    index = torch.tensor(list(block_ids), dtype=torch.long, device=storage.device)
    # [L, 2, n, bs, H, D] -> [n, L, 2, bs, H, D]: each block's bytes contiguous, then one copy out.
    blocks = storage.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous().cpu()
    raw = blocks.view(torch.uint8).reshape(len(block_ids), -1).numpy()
    return [KVRecord(key=key, identity=identity, layout=layout, payload=raw[i].tobytes()) for i, key in enumerate(keys)]


def records_to_blocks(kv_cache: KVCache, block_ids: Sequence[int], records: Sequence[KVRecord]) -> None:
    """Write each record's KV into pool block ``block_ids[i]`` (bitwise, in one copy in).

    Raises KVLayoutMismatchError if a record's layout is not this pool's (then nothing is
    written); keys and identities are the store's to have checked.
    """
    if len(block_ids) != len(records):
        raise ValueError(f"{len(block_ids)} blocks but {len(records)} records")
    if not records:
        return
    layout = block_layout(kv_cache)
    for record in records:
        if record.layout != layout:
            raise KVLayoutMismatchError(f"record {record.key.hex()[:16]}.. has layout {record.layout}, the pool {layout}")
    storage = _storage(kv_cache)
    buffer = bytearray().join(r.payload for r in records)  # one writable copy torch can wrap
    blocks = torch.frombuffer(buffer, dtype=torch.uint8).view(storage.dtype).reshape(len(records), *layout.shape)
    index = torch.tensor(list(block_ids), dtype=torch.long, device=storage.device)
    storage.index_copy_(2, index, blocks.permute(1, 2, 0, 3, 4, 5).to(storage.device))

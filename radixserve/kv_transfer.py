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

Copies here are synchronous, one per block (all layers at once, never per layer); the host-RAM
tier's pinned staging buffers and copy stream are a later step.
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


def _over(buffer: bytearray | memoryview, layout: KVLayout, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of one block's shape whose memory is ``buffer`` (no copy)."""
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(layout.shape)


def blocks_to_records(
    kv_cache: KVCache, block_ids: Sequence[int], keys: Sequence[BlockKey], identity: str
) -> list[KVRecord]:
    """Records of the given pool blocks: block ``block_ids[i]`` stored under ``keys[i]``.

    Each payload is a fresh bytearray the block is copied into once (on CUDA: gathered on the
    device first, then one device->host copy for the batch).
    """
    if len(block_ids) != len(keys):
        raise ValueError(f"{len(block_ids)} blocks but {len(keys)} keys")
    if not block_ids:
        return []
    layout = block_layout(kv_cache)
    storage = _storage(kv_cache)
    if storage.device.type == "cpu":
        # Slicing each block out beats a gather on CPU (index_select on dim 2 is a slow path).
        sources = [storage[:, :, block_id] for block_id in block_ids]
    else:
        index = torch.tensor(list(block_ids), dtype=torch.long, device=storage.device)
        sources = list(storage.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous().cpu())
    records = []
    for key, source in zip(keys, sources, strict=True):
        payload = bytearray(layout.nbytes)
        _over(payload, layout, storage.dtype).copy_(source)
        records.append(KVRecord(key=key, identity=identity, layout=layout, payload=payload))
    return records


def records_to_blocks(kv_cache: KVCache, block_ids: Sequence[int], records: Sequence[KVRecord]) -> None:
    """Write each record's KV into pool block ``block_ids[i]``, bitwise.

    Raises KVLayoutMismatchError if a record's layout is not this pool's (then nothing is
    written); keys and identities are the store's to have checked. A payload in read-only memory
    (bytes) is copied once first, since torch only wraps writable buffers; the disk store reads
    into writable ones.
    """
    if len(block_ids) != len(records):
        raise ValueError(f"{len(block_ids)} blocks but {len(records)} records")
    if not records:
        return
    layout = block_layout(kv_cache)
    for record in records:
        if record.layout != layout:
            raise KVLayoutMismatchError(
                f"record {record.key.hex()[:16]}.. has layout {record.layout}, the pool {layout}"
            )
    storage = _storage(kv_cache)
    for block_id, record in zip(block_ids, records, strict=True):
        payload = record.payload
        if memoryview(payload).readonly:
            payload = bytearray(payload)
        storage[:, :, block_id].copy_(_over(payload, layout, storage.dtype))

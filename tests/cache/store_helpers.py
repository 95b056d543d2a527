"""Records to put in stores, shared by the store tests and the subprocesses they kill."""

from __future__ import annotations

import hashlib

from radixserve.cache.block_keys import CacheIdentity, prefix_keys
from radixserve.cache.kv_store import KVLayout, KVRecord

CACHE_IDENTITY = CacheIdentity("toy@abc/float16", block_size=2)
IDENTITY = CACHE_IDENTITY.describe()
LAYOUT = KVLayout("float16", (2, 2, 2, 1, 4))  # 2 layers, K/V, 2 tokens, 1 head, head_dim 4: 64 bytes
KEYS = prefix_keys(CACHE_IDENTITY, "", list(range(80)))  # 40 chained block keys


def make_record(i: int, identity: str = IDENTITY) -> KVRecord:
    """Block i of the chain, with 64 payload bytes of its own."""
    payload = hashlib.sha256(str(i).encode()).digest() * 2
    return KVRecord(key=KEYS[i], identity=identity, layout=LAYOUT, payload=payload)

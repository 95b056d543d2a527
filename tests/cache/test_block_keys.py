"""Content keys: stable bytes, separated by identity and namespace, prefix-closed, unambiguous."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.cache.block_keys import (
    KEY_SIZE,
    KV_LAYOUT_VERSION,
    BlockKeyChain,
    CacheIdentity,
    block_key,
    chain_keys,
    prefix_keys,
    root_key,
)

IDENTITY = CacheIdentity(model="SmolLM2-135M-Instruct@0123456789abcdef/float32", block_size=4)
token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=24)
small_tokens = st.lists(st.integers(0, 3), max_size=20)


def test_known_vector_from_hashlib() -> None:
    """The encoding is the documented one, byte for byte (so it never drifts silently)."""
    model = IDENTITY.model.encode()
    ns = b"tenant-a"
    root = hashlib.sha256(
        b"radixserve/kv-root/v1\x00"
        + struct.pack("<I", len(model)) + model
        + struct.pack("<II", 4, KV_LAYOUT_VERSION)
        + struct.pack("<I", len(ns)) + ns
    ).digest()
    first = hashlib.sha256(b"radixserve/kv-block/v1\x00" + root + struct.pack("<5I", 4, 1, 2, 3, 70000)).digest()
    second = hashlib.sha256(b"radixserve/kv-block/v1\x00" + first + struct.pack("<5I", 4, 5, 6, 7, 8)).digest()

    assert root_key(IDENTITY, "tenant-a") == root
    assert prefix_keys(IDENTITY, "tenant-a", [1, 2, 3, 70000, 5, 6, 7, 8, 9]) == [first, second]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    return env


def test_stable_across_processes() -> None:
    """No per-process salt: a fresh interpreter (different PYTHONHASHSEED) computes the same keys."""
    code = (
        "from radixserve.cache.block_keys import CacheIdentity, prefix_keys;"
        "ids = prefix_keys(CacheIdentity('m@f/float16', 2), 'ns', [5, 6, 7, 8]);"
        "print(','.join(k.hex() for k in ids))"
    )
    env = {"PYTHONHASHSEED": "123", **_env()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    here = prefix_keys(CacheIdentity("m@f/float16", 2), "ns", [5, 6, 7, 8])
    assert out.strip() == ",".join(k.hex() for k in here)



def test_identity_fields_and_namespace_each_separate_keys() -> None:
    tokens = [1, 2, 3, 4]
    variants = [
        (IDENTITY, ""),
        (IDENTITY, "tenant-a"),
        (CacheIdentity(IDENTITY.model.replace("float32", "bfloat16"), 4), ""),
        (CacheIdentity(IDENTITY.model.replace("0123", "9123"), 4), ""),
        (CacheIdentity(IDENTITY.model, 4, kv_layout_version=KV_LAYOUT_VERSION + 1), ""),
    ]
    keys = {prefix_keys(identity, ns, tokens)[0] for identity, ns in variants}
    assert len(keys) == len(variants)
    # Block size is part of the root even where the first block's tokens coincide.
    assert root_key(CacheIdentity(IDENTITY.model, 2), "") != root_key(CacheIdentity(IDENTITY.model, 4), "")


def test_length_prefixed_fields_do_not_run_into_each_other() -> None:
    """Moving bytes between the model string and the namespace changes the root."""
    a = root_key(CacheIdentity("ab", 4), "c")
    b = root_key(CacheIdentity("a", 4), "bc")
    assert a != b


def test_only_full_blocks_get_keys() -> None:
    assert prefix_keys(IDENTITY, "", [1, 2, 3]) == []
    assert len(prefix_keys(IDENTITY, "", list(range(11)))) == 2
    assert all(len(k) == KEY_SIZE for k in prefix_keys(IDENTITY, "", list(range(8))))


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "7"])
def test_out_of_range_tokens_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="token ids"):
        block_key(root_key(IDENTITY, ""), [1, bad, 3, 4])  # type: ignore[list-item]


def test_bad_identity_and_parent_are_rejected() -> None:
    with pytest.raises(ValueError):
        CacheIdentity("", 4)
    with pytest.raises(ValueError):
        CacheIdentity("m", 0)
    with pytest.raises(ValueError):
        block_key(b"short", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        chain_keys(root_key(IDENTITY, ""), [1], 0)


@given(tokens=token_lists, cut=st.integers(0, 24))
def test_prefix_property_and_incremental_extension(tokens: list[int], cut: int) -> None:
    """Keys of a prefix are a prefix of the keys; extending from the last key equals one pass."""
    full = prefix_keys(IDENTITY, "ns", tokens)
    boundary = min(cut, len(tokens)) // IDENTITY.block_size * IDENTITY.block_size
    head = prefix_keys(IDENTITY, "ns", tokens[:boundary])
    assert full[: len(head)] == head
    parent = head[-1] if head else root_key(IDENTITY, "ns")
    assert head + chain_keys(parent, tokens[boundary:], IDENTITY.block_size) == full


@given(a=small_tokens, b=small_tokens)
def test_keys_equal_exactly_when_whole_block_prefixes_equal(a: list[int], b: list[int]) -> None:
    """Over a tiny alphabet (constant near-misses), key i matches iff blocks 0..i match."""
    ka, kb = prefix_keys(IDENTITY, "", a), prefix_keys(IDENTITY, "", b)
    bs = IDENTITY.block_size
    for i in range(min(len(ka), len(kb))):
        assert (ka[i] == kb[i]) == (a[: (i + 1) * bs] == b[: (i + 1) * bs])


@given(a=token_lists, b=token_lists)
def test_block_encoding_is_unambiguous(a: list[int], b: list[int]) -> None:
    """Different token lists (any lengths) under the same parent never share a key."""
    parent = root_key(IDENTITY, "")
    assert (block_key(parent, a) == block_key(parent, b)) == (a == b)


@given(ns_a=st.text(max_size=8), ns_b=st.text(max_size=8), tokens=st.lists(st.integers(0, 9), min_size=4, max_size=8))
def test_namespaces_never_share_keys(ns_a: str, ns_b: str, tokens: list[int]) -> None:
    ka, kb = prefix_keys(IDENTITY, ns_a, tokens), prefix_keys(IDENTITY, ns_b, tokens)
    assert (ka == kb) == (ns_a == ns_b)


@given(tokens=token_lists, cuts=st.lists(st.integers(0, 24), max_size=5))
def test_key_chain_grows_to_the_one_pass_keys(tokens: list[int], cuts: list[int]) -> None:
    chain = BlockKeyChain(IDENTITY, "ns")
    seen: list[bytes] = []
    for cut in sorted(cuts) + [len(tokens)]:
        new = chain.update(tokens[:cut])
        seen.extend(new)
        assert chain.keys == prefix_keys(IDENTITY, "ns", tokens[:cut])
    assert seen == chain.keys == prefix_keys(IDENTITY, "ns", tokens)

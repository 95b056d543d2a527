"""The tile rule of the batch-invariant Triton matmul (model/matmul_tiles.py), without Triton:
whatever M is, the K reduction order a row goes through is the same, and only the output
tiling and the split (which programs compute what) follow M."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.model import matmul_tiles as MT

DTYPES = ["bfloat16", "float16", "float32"]


def chunk_ranges(k: int, dtype: str) -> list[range]:
    """The K ranges reduced from zero and added to the total in order: what fixes a row's bits."""
    order = MT.reduction_order(dtype)
    steps = -(-k // order.block_k)
    return [
        range(c * order.chunk, min(k, (c + 1) * order.chunk))
        for c in range(order.num_chunks(k))
        if c * order.chunk_steps < steps
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_cover_k_in_order_from_zero(dtype):
    order = MT.reduction_order(dtype)
    for k in (1, order.block_k, order.chunk - 1, order.chunk, order.chunk + 1, 4096, 14336, 576):
        ranges = chunk_ranges(k, dtype)
        assert ranges[0].start == 0 and ranges[-1].stop == k
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
        assert len(ranges) == order.num_chunks(k)


@given(m1=st.integers(1, 70000), m2=st.integers(1, 70000), n=st.integers(1, 200000), k=st.integers(1, 40000),
       dtype=st.sampled_from(DTYPES))  # fmt: skip
def test_what_fixes_a_rows_bits_never_depends_on_m(m1, m2, n, k, dtype):
    """Every M's launch reduces a row over the same chunks with the same BLOCK_K; M changes only
    the output tiling (block_m/block_n/warps/stages) and whether chunks run as separate programs."""
    order = MT.reduction_order(dtype)
    assert chunk_ranges(k, dtype) == chunk_ranges(k, dtype)  # a function of (K, dtype) alone
    for m in (m1, m2):
        tiles = MT.tiles_for(m, dtype)
        assert tiles.block_m % 16 == 0 and tiles.block_n % 16 == 0  # whole MMA tiles, any M
        split = MT.split_chunks(m, n, k, dtype, num_sms=132, max_tiles=1 << 14)
        assert not split or order.num_chunks(k) > 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_buckets_grow_with_m_and_cover_every_m(dtype):
    tops = [top for top, _ in MT.BUCKETS[dtype]]
    assert tops == sorted(tops) and tops[-1] >= 1 << 40
    previous = 0
    for m in (1, 2, 15, 16, 17, 33, 64, 65, 256, 257, 4096, 1 << 20):
        tiles = MT.tiles_for(m, dtype)
        assert tiles.block_m >= previous
        previous = tiles.block_m


def test_decode_gets_small_tiles_and_a_split_prefill_neither():
    """The cost lever: an 8B decode projection (M=1, N=K=4096) runs 16-row tiles and splits K
    into chunks (4 x 64 = 256 programs instead of 32); a 4096-token prefill fills the GPU unsplit."""
    decode = MT.tiles_for(1, "bfloat16")
    assert decode.block_m == 16
    assert MT.split_chunks(1, 4096, 4096, "bfloat16", 132, 1 << 14)
    assert MT.tiles_for(4096, "bfloat16").block_m == 128
    assert not MT.split_chunks(4096, 4096, 4096, "bfloat16", 132, 1 << 14)
    assert not MT.split_chunks(1, 4096, 512, "bfloat16", 132, 1 << 14)  # one chunk: nothing to split


def test_fit_stages_keeps_the_tile_and_drops_stages():
    tiles = MT.MatmulTiles(128, 256, 8, 3)
    assert MT.fit_stages(tiles, 64, 2, 227 * 1024) == tiles
    small = MT.fit_stages(tiles, 64, 2, 99 * 1024)
    assert (small.block_m, small.block_n, small.num_warps, small.num_stages) == (128, 256, 8, 2)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="int8"):
        MT.tiles_for(1, "int8")

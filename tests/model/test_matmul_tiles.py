"""The launch rule of the batch-invariant Triton matmul (model/matmul_tiles.py), without Triton:
whatever M is, a row is reduced over K in the same steps, chunks and order; only the output
tiling and the split (which programs compute what) follow M."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.model import matmul_tiles as MT

DTYPES = ["bfloat16", "float16", "float32"]
H200 = dict(num_sms=132, smem_bytes=227 * 1024, max_split_tiles=1 << 14)


def launch(m: int, n: int, k: int, dtype: str, **kw) -> MT.MatmulLaunch:
    return MT.plan_launch(m, n, k, dtype, elem_bytes=4 if dtype == "float32" else 2, **{**H200, **kw})


@given(m1=st.integers(1, 70000), m2=st.integers(1, 70000), n=st.integers(1, 200000), k=st.integers(1, 40000),
       dtype=st.sampled_from(DTYPES), sms=st.sampled_from([1, 16, 132, 100000]))  # fmt: skip
def test_a_rows_k_schedule_never_depends_on_m(m1, m2, n, k, dtype, sms):
    """Any two batch sizes (and GPU sizes, so split or not) reduce a row over the same MMA steps,
    grouped into the same chunks, summed in the same order; the steps cover K once, in order."""
    a, b = launch(m1, n, k, dtype, num_sms=sms), launch(m2, n, k, dtype)
    assert a.k_schedule(k) == b.k_schedule(k)
    flat = [offset for chunk in a.k_schedule(k) for offset in chunk]
    assert flat == list(range(0, k, a.order.block_k))
    for plan in (a, b):
        assert plan.tiles.block_m % 16 == 0 and plan.tiles.block_n % 16 == 0  # whole MMA tiles
        assert plan.grid[1] == (len(plan.k_schedule(k)) if plan.split and plan.tiles.kernel != "stream_tma" else 1)


@given(m=st.integers(1, 70000), n=st.integers(1, 200000), k=st.integers(1, 40000), dtype=st.sampled_from(DTYPES))
def test_the_grid_covers_every_output_tile(m, n, k, dtype):
    plan = launch(m, n, k, dtype)
    out_tiles = -(-m // plan.tiles.block_m) * -(-n // plan.tiles.block_n)
    if plan.tiles.kernel == "stream_tma":  # runs over (tile, chunk) units: at most one a unit
        assert plan.grid[0] == min(out_tiles * plan.order.num_chunks(k), 132 * plan.tiles.per_sm)
        return
    assert plan.grid[0] * plan.tiles.block_m * plan.tiles.block_n >= m * n
    assert plan.grid[0] == out_tiles


def test_decode_gets_small_tiles_and_a_split_prefill_neither():
    """The cost lever: an 8B decode projection (M=1, N=K=4096) runs 16-row tiles and its four
    1024-wide K chunks as programs of their own (128 programs instead of 32); a 4096-token
    prefill fills the GPU unsplit; a one-chunk K has nothing to split."""
    decode = launch(1, 4096, 4096, "bfloat16")
    assert decode.tiles.block_m == 16 and decode.split and decode.grid == (32, 4)
    prefill = launch(4096, 4096, 4096, "bfloat16")
    assert prefill.tiles.block_m == 128 and not prefill.split
    assert not launch(1, 4096, 512, "bfloat16").split
    assert not launch(1, 4096, 4096, "bfloat16", split=True, max_split_tiles=10).split  # counters too few


@pytest.mark.parametrize("dtype", DTYPES)
def test_buckets_grow_with_m_and_cover_every_m(dtype):
    tops = [top for top, _ in MT.BUCKETS[dtype]]
    assert tops == sorted(tops) and tops[-1] >= 1 << 40
    sizes = [MT.tiles_for(m, dtype).block_m for m in (1, 2, 15, 16, 17, 33, 64, 65, 256, 257, 4096, 1 << 20)]
    assert sizes == sorted(sizes)


def test_fit_stages_keeps_the_tile_and_drops_stages():
    tiles = MT.MatmulTiles(128, 256, 8, 3)
    assert MT.fit_stages(tiles, 64, 2, 227 * 1024) == tiles
    assert MT.fit_stages(tiles, 64, 2, 99 * 1024) == MT.MatmulTiles(128, 256, 8, 2)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="int8"):
        MT.tiles_for(1, "int8")


def test_a_tiles_load_width_must_fit_the_k_order():
    """load_k changes how wide each loop step loads, never which MMA steps or chunks a row gets:
    a width that is not a multiple of BLOCK_K, or does not divide the chunk, is refused."""
    order = MT.reduction_order("bfloat16")  # 64 x 16 = 1024-wide chunks
    assert MT.MatmulTiles(128, 256, 8, 2, "flat_tma", 128).step_k(order) == 128
    assert MT.MatmulTiles(128, 256, 8, 2).step_k(order) == order.block_k
    for bad in (32, 96, 384):
        with pytest.raises(ValueError, match="load_k"):
            launch(4096, 4096, 4096, "bfloat16", tiles=MT.MatmulTiles(128, 256, 8, 2, "flat", bad))


def test_kernel_choice_is_checked_and_keeps_the_k_schedule():
    base = launch(4096, 4096, 14336, "bfloat16")
    for kernel in MT.KERNELS:
        plan = launch(4096, 4096, 14336, "bfloat16", tiles=MT.MatmulTiles(128, 256, 8, 3, kernel))
        assert plan.k_schedule(14336) == base.k_schedule(14336) and plan.tiles.kernel == kernel
    with pytest.raises(ValueError, match="unknown kernel"):
        launch(1, 4096, 4096, "bfloat16", tiles=MT.MatmulTiles(16, 128, 4, 4, "cutlass"))


def test_fit_stages_counts_the_tiles_own_load_width_and_keeps_its_kernel():
    tiles = MT.MatmulTiles(128, 256, 8, 3, "flat_tma", 128)  # 96 KiB a stage
    assert MT.fit_stages(tiles, 64, 2, 227 * 1024) == MT.MatmulTiles(128, 256, 8, 2, "flat_tma", 128)


def test_a_persistent_launch_runs_one_program_per_sm_at_most_and_never_splits():
    tiles = MT.MatmulTiles(128, 256, 8, 3, "persistent_tma")
    prefill = launch(4096, 4096, 4096, "bfloat16", tiles=tiles)
    assert prefill.grid == (132, 1) and not prefill.split  # 512 output tiles on 132 programs
    small = launch(64, 4096, 14336, "bfloat16", tiles=tiles, split=True)
    assert small.grid == (16, 1) and not small.split
    assert small.k_schedule(14336) == launch(64, 4096, 14336, "bfloat16").k_schedule(14336)


@given(m=st.integers(1, 70000), n=st.integers(1, 200000), k=st.integers(1, 40000))
def test_the_split_rule_counts_the_tiles_the_launch_runs(m, n, k):
    """Without an override the launch splits exactly as split_chunks says for the bucket's tiles;
    with other tiles, by those tiles' own count (the sweep times candidates under the rule)."""
    plan = launch(m, n, k, "bfloat16")
    if MT.tiles_for(m, "bfloat16").kernel == "stream_tma":  # a stream bucket: whole chunks or flat_tma by the rule
        order = MT.reduction_order("bfloat16")
        if k % order.chunk == 0 and order.num_chunks(k) > 1 and plan.tiles.kernel == "stream_tma":
            assert plan.split
            return
    assert plan.split == MT.split_chunks(m, n, k, "bfloat16", 132, 1 << 14)
    wide = MT.MatmulTiles(64, 256, 8, 3)
    out_tiles = -(-m // 64) * -(-n // 256)
    expect = out_tiles < MT.SPLIT_FILL * 132 and MT.reduction_order("bfloat16").num_chunks(k) > 1
    assert launch(m, n, k, "bfloat16", tiles=wide).split == expect


def test_a_stream_launch_cuts_whole_chunks_into_per_sm_runs_or_falls_back_to_flat_tma():
    tiles = MT.MatmulTiles(64, 128, 4, 4, "stream_tma", per_sm=2)
    down = launch(64, 4096, 14336, "bfloat16", tiles=tiles)
    assert down.split and down.grid == (2 * 132, 1)  # 32 tiles x 14 chunks = 448 units on 264 runs
    small = launch(64, 256, 4096, "bfloat16", tiles=tiles)
    assert small.grid == (2 * 4, 1)  # 2 tiles x 4 chunks: one unit a program
    assert down.k_schedule(14336) == launch(64, 4096, 14336, "bfloat16").k_schedule(14336)
    for k, kw in ((4096 + 64, {}), (1024, {}), (4096, {"split": False}), (4096, {"max_split_tiles": 31})):
        plan = launch(64, 4096, k, "bfloat16", tiles=tiles, **kw)  # part chunk / 1 chunk / no split / no counters
        assert plan.tiles.kernel == "flat_tma" and plan.grid[0] == 32

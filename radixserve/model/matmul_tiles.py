"""Tile choice for the batch-invariant Triton matmul (`triton_batch_invariant`), kept free of
Triton and torch.cuda so that CI (no GPU, no Triton) tests the rule the guarantee rests on.

A row's result depends only on the sequence of fp32 operations that reduce it over K. That
sequence is fixed by two numbers per dtype, `ReductionOrder`: BLOCK_K (the K width of each MMA
step: 64 for bf16 = four k16 tensor-core instructions chained into the accumulator) and
CHUNK_STEPS (K is cut into fixed chunks of CHUNK_STEPS * BLOCK_K, counted from 0; each chunk is
reduced from a zero accumulator and the chunk sums are added to the total in chunk order).
Neither depends on M, so neither does a row's result.

Everything else is free to follow M, because it only decides which program computes which
output tile: BLOCK_M / BLOCK_N / warps / stages come from an M bucket (small tiles for decode,
where a 128-row tile is 127/128 padding and leaves an 8B projection with 32 programs on 132
SMs; 128 x 256 for prefill), and a launch whose tiles do not fill the GPU runs its chunks as
separate programs (a fixed split-K) whose partial sums the last one to finish adds in chunk
order - the same additions, so the same bits, as one program walking every chunk. The
`stream_tma` form cuts the same (tile, chunk) units into one contiguous run per program instead
(stream-K in whole chunks: no wave tail; partials only where a tile straddles runs).

The one assumption (vLLM's batch-invariant tables make it too): a tensor core gives an output
element the same bits whatever tile shape the MMA instruction is issued in. Measured on an H200
(bench/bench_batch_invariant_matmul.py, 2026-11-30): 16- and 32-row tiles (mma.sync) and 64- to
128-row tiles (wgmma), split or not, gave every row the bits of the 128 x 256 prefill tile, on all
Llama-3-8B shapes; tests/engine/test_deterministic_gpu.py checks it end to end. Re-run the probe
on a new GPU generation before trusting a new bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class ReductionOrder:
    """What fixes a row's bits: the same for every M (never change one without re-checking)."""

    block_k: int
    chunk_steps: int  # BLOCK_K steps per chunk; chunk c covers K [c * chunk, (c + 1) * chunk)

    @property
    def chunk(self) -> int:
        return self.block_k * self.chunk_steps

    def num_chunks(self, k: int) -> int:
        return max(1, -(-k // self.chunk))


@dataclass(frozen=True, slots=True)
class MatmulTiles:
    """How the output is cut into programs: free to follow M (it moves no addition)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # The K loop's form: "nested" (a loop per chunk inside a loop over chunks: the pipeline drains
    # at every chunk end) or "flat" (one pipelined loop over every step, the chunk's sum added to
    # the total when its last step is done); "flat_tma" loads A and W tiles with TMA descriptors;
    # "persistent_tma": flat_tma in one program per SM looping over output tiles (never split);
    # "stream_tma": stream-K over whole K chunks - the (output tile, K chunk) units, tile-major,
    # cut into per_sm * SMs contiguous runs of near-equal length, each walked in one pipelined
    # loop, every chunk's sum merged in chunk order by the tile's last arrival (a split launch
    # whose programs each take several units: no wave tail). Same MMA steps, same additions: the
    # probe checks the bits of every one it ships.
    kernel: str = "nested"
    # K width of one load (0: the order's BLOCK_K). A multiple of the order's BLOCK_K chains the
    # same k16 MMA instructions in the same order (checked by the probe, like any tile).
    load_k: int = 0
    # Programs per SM of the persistent forms (persistent_tma, stream_tma).
    per_sm: int = 1

    def step_k(self, order: "ReductionOrder") -> int:
        """The K width of one loop step for this order (a multiple of BLOCK_K dividing the chunk)."""
        k = self.load_k or order.block_k
        if k % order.block_k or order.chunk % k:
            raise ValueError(f"load_k {k} must be a multiple of BLOCK_K {order.block_k} dividing the chunk {order.chunk}")
        return k


# 16 steps of 64 = 1024-wide K chunks: an 8B decode projection (K = 4096 or 14336) splits into
# 4 or 14 programs per output tile; a prefill program pays one extra fp32 add per 16 MMA steps.
REDUCTION = {
    "bfloat16": ReductionOrder(block_k=64, chunk_steps=16),
    "float16": ReductionOrder(block_k=64, chunk_steps=16),
    "float32": ReductionOrder(block_k=32, chunk_steps=32),
}

# (largest M of the bucket, tiles); the last bucket takes every larger M. BLOCK_M >= 16 (the MMA
# row granularity). Chosen from bench/bench_batch_invariant_matmul.py on the H200 (2026-11-30,
# Llama-3-8B shapes, CUDA-graph timed; every tile below gave every row the bits of the 128 x 256
# prefill tile, split or not): M=1 16x128+split beat 16x64+split on qkv/o/gate_up (15.4/11.0/66.7
# us vs 16.4/12.6/72.3), M=4096 128x256 beat 128x128 by 8-12% on every shape.
# Then bench/bench_deterministic_sweep.py (H200, 2026-11-30 20:19 UTC, every candidate bitwise equal
# to the nested 128x256 prefill launch at M = 1 ... 4096): at M=4096 flat_tma 128x256 w8 s3 ran
# the four projections in 1.07-1.14x cuBLAS (qkv 298.9, o 192.4, gate_up 1412.3, down 662.5 us)
# where the nested kernel took 1.54-1.62x (a step's matmuls 82.1 vs 115.4 ms, cuBLAS 73.8); the
# pointer-loaded flat loop was 5x slower still (no pipelining); persistent_tma 2-8% behind. At M=1
# flat_tma 16x128 took a step's matmuls from 4.43 to 4.28 ms (o 11.3 -> 8.9 us). At M=32 and 64
# no candidate beat the nested kernel: those buckets stay.
# M in (32, 64] (the cached TTFT's 64 new tokens): the sweep of 2026-11-30 23:59 UTC (H200, 0 bit
# mismatches among 38 candidates at M = 1 ... 4096) put flat_tma 64x64 w4 s6 first as one tile for
# every shape: a step's matmuls 5.17 vs 5.82 ms nested 64x64 s4 (cuBLAS 4.19), mostly gate_up
# (unsplit, 448 programs: 63.4 vs 80.3 us) and down (split: 54.4 vs 58.9); qkv and o within 0.3 us.
_HALF_BUCKETS: tuple[tuple[int, MatmulTiles], ...] = (
    (16, MatmulTiles(16, 128, 4, 4, "flat_tma")),
    (32, MatmulTiles(32, 64, 4, 5)),
    (64, MatmulTiles(64, 64, 4, 6, "flat_tma")),
    (256, MatmulTiles(64, 128, 4, 4)),
    (1 << 62, MatmulTiles(128, 256, 8, 3, "flat_tma")),
)
BUCKETS: dict[str, tuple[tuple[int, MatmulTiles], ...]] = {
    "bfloat16": _HALF_BUCKETS,
    "float16": _HALF_BUCKETS,
    # fp32 runs IEEE dots (no tensor cores); one tile shape for every M.
    "float32": ((1 << 62, MatmulTiles(128, 128, 8, 3)),),
}

KERNELS = ("nested", "flat", "flat_tma", "persistent_tma", "stream_tma")
GROUP_M = 8  # row tiles that sweep the column tiles together (weight tiles stay in L2)
SPLIT_FILL = 2  # split K when a launch has fewer output tiles than this many per SM


def reduction_order(dtype: str) -> ReductionOrder:
    """The K order for this dtype (a dtype name: "bfloat16", "float16", "float32")."""
    try:
        return REDUCTION[dtype]
    except KeyError:
        raise ValueError(f"deterministic matmul: unsupported dtype {dtype!r} (bfloat16, float16, float32)") from None


def tiles_for(m: int, dtype: str) -> MatmulTiles:
    """The output tiling for an M-row problem."""
    reduction_order(dtype)  # the same error for an unknown dtype
    for top, tiles in BUCKETS[dtype]:
        if m <= top:
            return tiles
    raise AssertionError("the last bucket takes every M")


@dataclass(frozen=True, slots=True)
class MatmulLaunch:
    """One launch of the kernel: what it reduces in which order, and how it is cut into programs."""

    order: ReductionOrder
    tiles: MatmulTiles
    # Chunk sums go through fp32 partials merged in chunk order by the tile's last arrival: one
    # program per (output tile, K chunk), or (stream_tma) per run of such units.
    split: bool
    grid: tuple[int, int]  # (output tiles, K chunks if split else 1); stream_tma: (runs, 1)

    def k_schedule(self, k: int) -> list[list[int]]:
        """The K offsets each chunk's MMA steps start at, chunk by chunk in the order their sums
        reach the total: the whole of what decides an output element's bits besides its inputs
        (the kernel's loops, written out)."""
        steps = -(-k // self.order.block_k)
        per_chunk = self.order.chunk_steps
        return [
            [s * self.order.block_k for s in range(c * per_chunk, min((c + 1) * per_chunk, steps))]
            for c in range(self.order.num_chunks(k))
        ]


def plan_launch(
    m: int, n: int, k: int, dtype: str, *, num_sms: int, smem_bytes: int, elem_bytes: int, max_split_tiles: int,
    tiles: MatmulTiles | None = None, split: bool | None = None,
) -> MatmulLaunch:  # fmt: skip
    """The launch for an [m, k] x [n, k]^T problem: the dtype's K order, the M bucket's tiles
    (fewer stages where shared memory is short) and the split rule; `tiles` / `split` override
    the choice (tests, the device probe), never the order."""
    order = reduction_order(dtype)
    tiles = fit_stages(tiles or tiles_for(m, dtype), order.block_k, elem_bytes, smem_bytes)
    tiles.step_k(order)  # a load width the order cannot take is an error, not other bits
    if tiles.kernel not in KERNELS:
        raise ValueError(f"deterministic matmul: unknown kernel {tiles.kernel!r} ({', '.join(KERNELS)})")
    out_tiles = -(-m // tiles.block_m) * -(-n // tiles.block_n)
    chunks = order.num_chunks(k)
    if tiles.kernel == "stream_tma":
        # Its units are whole chunks: K must be whole chunks (a partial last chunk would need a
        # shorter unit) and the tiles within the arrival counters; else the flat_tma launch.
        if k % order.chunk == 0 and chunks > 1 and out_tiles <= max_split_tiles and split is not False:
            return MatmulLaunch(order, tiles, True, (min(out_tiles * chunks, num_sms * tiles.per_sm), 1))
        tiles = replace(tiles, kernel="flat_tma")
    if split is None:
        split = out_tiles < SPLIT_FILL * num_sms  # the rule of split_chunks, on these tiles
    split = split and chunks > 1 and out_tiles <= max_split_tiles and tiles.kernel != "persistent_tma"
    if tiles.kernel == "persistent_tma":
        return MatmulLaunch(order, tiles, False, (min(out_tiles, num_sms * tiles.per_sm), 1))
    return MatmulLaunch(order, tiles, split, (out_tiles, chunks if split else 1))


def split_chunks(m: int, n: int, k: int, dtype: str, num_sms: int, max_tiles: int) -> bool:
    """Whether to run the K chunks as separate programs (merged in chunk order by the last one):
    when the output tiles alone would leave the GPU underfilled, there is more than one chunk,
    and the arrival counters cover the tiles. A speed choice only: the bits are the same."""
    tiles = tiles_for(m, dtype)
    out_tiles = -(-m // tiles.block_m) * -(-n // tiles.block_n)
    return reduction_order(dtype).num_chunks(k) > 1 and out_tiles < SPLIT_FILL * num_sms and out_tiles <= max_tiles


def fit_stages(tiles: MatmulTiles, block_k: int, elem_bytes: int, smem_bytes: int) -> MatmulTiles:
    """Fewer pipeline stages where every stage's A and W tiles would not fit in shared memory
    (stages change no bits). `block_k` is the order's; the tile's own load width wins."""
    per_stage = (tiles.block_m + tiles.block_n) * (tiles.load_k or block_k) * elem_bytes
    stages = max(1, min(tiles.num_stages, smem_bytes // max(per_stage, 1)))
    if stages == tiles.num_stages:
        return tiles
    return replace(tiles, num_stages=stages)

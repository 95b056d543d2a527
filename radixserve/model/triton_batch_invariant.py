"""Batch-invariant matmul on Triton: the GPU half of deterministic mode (`--deterministic`).

cuBLAS picks its kernel, tile shape and split-K from the problem size, so the same row of an
activation matrix is reduced in another order when the batch has 1 row than when it has 64, or
4096 (a prefill). Here every linear layer runs one kernel whose reduction order along K is fixed
per dtype (`matmul_tiles.ReductionOrder`: BLOCK_K-wide MMA steps inside fixed K chunks counted
from 0, each chunk from a zero fp32 accumulator, chunk sums added in chunk order), while the
output tiling follows M (`matmul_tiles.tiles_for`: 16-row tiles for decode, 128 x 256 for
prefill) and a launch that would underfill the GPU runs its K chunks as separate programs, the
last of which to arrive adds the partials in chunk order (the same fp32 additions). No
autotuning, and M is not a specialization key (`do_not_specialize`). fp32 runs IEEE (not TF32)
dots, like torch's default.

Only imported on a CUDA device (or under TRITON_INTERPRET=1): CI has no Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from radixserve.model.matmul_tiles import GROUP_M, MatmulTiles, plan_launch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Arrival counters of split launches (one per output tile); a launch with more output tiles
# than this does not split (it never needs to: it fills the GPU).
MAX_SPLIT_TILES = 1 << 14


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP: tl.constexpr):
    """Output tile number -> (row tile, column tile) in grouped order: GROUP row tiles sweep the
    column tiles together (the weight tiles stay in L2)."""
    per_group = GROUP * num_pid_n
    first_m = (tile // per_group) * GROUP
    size_m = tl.minimum(num_pid_m - first_m, GROUP)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _fold_parts(part_ptr, part_rows, out_mask, M, N, n_chunks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[0] + part[1] + ... in chunk order, from zero. The fold is on the critical path (the
    tile's last program does it alone), and one partial loaded at a time pays an L2 round trip
    per chunk (14 for K = 14336): tiles of up to 64x64 load four at a time, then add them in
    order. A chunk past the last loads as +0.0, an exact no-op (the sum, started from +0.0 in
    round-to-nearest, is never -0.0). Loads bypass L1 (.cg): other SMs just wrote the partials."""
    merged = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    chunk_rows = M.to(tl.int64) * N
    if BLOCK_M * BLOCK_N <= 4096:  # four partials in registers: 4 x 32 per thread on 4 warps
        for c in range(0, n_chunks, 4):
            p0 = tl.load(part_ptr + c * chunk_rows + part_rows, mask=out_mask, other=0.0, cache_modifier=".cg")
            p1 = tl.load(part_ptr + (c + 1) * chunk_rows + part_rows, mask=out_mask & (c + 1 < n_chunks), other=0.0,
                         cache_modifier=".cg")
            p2 = tl.load(part_ptr + (c + 2) * chunk_rows + part_rows, mask=out_mask & (c + 2 < n_chunks), other=0.0,
                         cache_modifier=".cg")
            p3 = tl.load(part_ptr + (c + 3) * chunk_rows + part_rows, mask=out_mask & (c + 3 < n_chunks), other=0.0,
                         cache_modifier=".cg")
            merged += p0
            merged += p1
            merged += p2
            merged += p3
    else:
        for c in range(0, n_chunks):
            merged += tl.load(part_ptr + c * chunk_rows + part_rows, mask=out_mask, other=0.0, cache_modifier=".cg")
    return merged


@triton.jit
def _store_tile(total, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, stride_cm, tile, chunk_lo, n_chunks, offs_m,
                offs_n, rn, m_ok, n_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                HAS_BIAS: tl.constexpr):  # fmt: skip
    """Write a tile's fp32 sum (+ bias) to c. With SPLIT, total is chunk chunk_lo's sum only: it is
    parked in part[chunk_lo] ([n_chunks, M, N] fp32) and the tile's last program to arrive adds
    part[0], part[1], ... in order."""
    out_mask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    if SPLIT:
        part_rows = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + chunk_lo.to(tl.int64) * M * N + part_rows, total, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is counted
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == n_chunks - 1:
            merged = _fold_parts(part_ptr, part_rows, out_mask, M, N, n_chunks, BLOCK_M, BLOCK_N)
            if HAS_BIAS:
                merged += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
            tl.store(c_ptrs, merged.to(c_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counters_ptr + tile, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            total += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    a_ptr, w_ptr, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """c[M, N] = a[M, K] @ w[N, K]^T (+ bias). Program (tile, 0) walks every K chunk; with SPLIT,
    program (tile, chunk) does one chunk, stores its fp32 sum in part[chunk], and the last
    program of the tile to arrive adds part[0], part[1], ... in order. a's and w's last dimension
    must be contiguous."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Out-of-range rows and columns read row/column 0 (always valid) and are never stored.
    rm = tl.where(m_ok, offs_m, 0).to(tl.int64)
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    k_steps = tl.cdiv(K, BLOCK_K)
    n_chunks = tl.cdiv(k_steps, CHUNK_STEPS)
    if SPLIT:
        chunk_lo = tl.program_id(1)
        chunk_hi = chunk_lo + 1
    else:
        chunk_lo = 0
        chunk_hi = n_chunks
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in tl.range(chunk_lo, chunk_hi, flatten=True):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(chunk * CHUNK_STEPS, tl.minimum(chunk * CHUNK_STEPS + CHUNK_STEPS, k_steps)):
            k0 = step * BLOCK_K
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + offs_k)[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=k_ok[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        total += acc
    _store_tile(total, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, stride_cm, pid, chunk_lo, n_chunks, offs_m, offs_n,
                rn, m_ok, n_ok, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS)  # fmt: skip


@triton.jit
def _flat_tile(
    a_ptr, w_ptr, a_desc, w_desc, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    tile, chunk_lo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """One output tile (with SPLIT: one K chunk of it) of _matmul_kernel_flat."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rm = tl.where(m_ok, offs_m, 0).to(tl.int64)
    rn = tl.where(n_ok, offs_n, 0).to(tl.int64)
    k_steps = tl.cdiv(K, BLOCK_K)
    n_chunks = tl.cdiv(k_steps, CHUNK_STEPS)
    if SPLIT:
        step_lo = chunk_lo * CHUNK_STEPS
        step_hi = tl.minimum(step_lo + CHUNK_STEPS, k_steps)
    else:
        step_lo = 0
        step_hi = k_steps
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(step_lo, step_hi, num_stages=NUM_STAGES):
        k0 = step * BLOCK_K
        if TMA:
            a = a_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0]).T
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + offs_k)[None, :], mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if (step % CHUNK_STEPS == CHUNK_STEPS - 1) or (step == step_hi - 1):
            total += acc
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    _store_tile(total, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, stride_cm, tile, chunk_lo, n_chunks, offs_m, offs_n,
                rn, m_ok, n_ok, BLOCK_M, BLOCK_N, SPLIT, HAS_BIAS)  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel_flat(
    a_ptr, w_ptr, a_desc, w_desc, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    NUM_STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """_matmul_kernel's additions in one pipelined loop over the K steps (the nested loop drains
    the software pipeline at every chunk end): the chunk's accumulator starts from zero, takes
    CHUNK_STEPS BLOCK_K-wide MMA steps and is added to the total after its last one; with TMA
    the A and W tiles come through the tensor descriptors (rows past M / K read as zeros). With
    PERSISTENT (never SPLIT) each program takes output tiles pid, pid + programs, ..."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _flat_tile(a_ptr, w_ptr, a_desc, w_desc, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, K, stride_am,
                       stride_wn, stride_cm, tile, 0, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK_STEPS, GROUP, False,
                       HAS_BIAS, IEEE, TMA, NUM_STAGES)  # fmt: skip
    else:
        _flat_tile(a_ptr, w_ptr, a_desc, w_desc, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, K, stride_am,
                   stride_wn, stride_cm, tl.program_id(0), tl.program_id(1), BLOCK_M, BLOCK_N, BLOCK_K, CHUNK_STEPS,
                   GROUP, SPLIT, HAS_BIAS, IEEE, TMA, NUM_STAGES)  # fmt: skip


@triton.jit
def _cta_barrier(token, INTERPRET: tl.constexpr):
    """bar.sync 0 (what tl.debug_barrier emits) as side-effecting inline asm: Triton 3.6 does not
    software-pipeline a loop whose body holds a tl.debug_barrier (checked by compiling for sm_90:
    one stage of shared memory instead of NUM_STAGES), but does with this. The interpreter runs
    no PTX: there, tl.debug_barrier."""
    if INTERPRET:
        tl.debug_barrier()
    else:
        tl.inline_asm_elementwise("bar.sync 0;\n mov.u32 $0, $1;", "=r,r", [token], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _stream_merge(part_ptr, bias_ptr, c_ptr, counters_ptr, M, N, stride_cm, tile, prefix_chunk, offs_m, offs_n,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """The tile's last arrival: part[prefix_chunk] (chunks 0 ... prefix_chunk already summed in
    order by one program) plus part[prefix_chunk + 1], ... in chunk order, the bias, the store."""
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    part_rows = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    # .cg: the partials were just written by other SMs (bypass L1)
    merged = tl.load(part_ptr + prefix_chunk.to(tl.int64) * M * N + part_rows, mask=out_mask, other=0.0, cache_modifier=".cg")
    # A loop, not unrolled: unrolled, 64x128 tiles on 4 warps spilled (255 registers + 168 bytes).
    for c in range(prefix_chunk + 1, N_CHUNKS):
        merged += tl.load(part_ptr + c * M * N + part_rows, mask=out_mask, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        merged += tl.load(bias_ptr + tl.where(offs_n < N, offs_n, 0)).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], merged.to(c_ptr.dtype.element_ty), mask=out_mask)
    tl.store(counters_ptr + tile, 0)  # ready for the next launch


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel_stream(
    a_ptr, w_ptr, a_desc, w_desc, bias_ptr, c_ptr, part_ptr, counters_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    N_CHUNKS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
    NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Stream-K over whole K chunks (K = N_CHUNKS chunks exactly). The units (output tile, K
    chunk), tile-major, are cut into one contiguous run per program, walked in one pipelined
    loop, each chunk's MMA steps from a zero accumulator. A tile the run holds from chunk 0 is
    summed in registers in chunk order (the unsplit kernel's additions): stored to c if the run
    holds all of it, else parked as a prefix sum in part[last chunk held]; the chunks of a tile
    begun by an earlier run are parked one by one in part[chunk]. The tile's last arrival (the
    arrivals count chunks) adds the prefix and the later chunks in order - the same additions,
    so the same bits as one program walking every chunk."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    units = num_pid_m * num_pid_n * N_CHUNKS
    programs = tl.num_programs(0)
    pid = tl.program_id(0).to(tl.int64)
    first = (pid * units // programs).to(tl.int32)
    last = ((pid + 1) * units // programs).to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.range(first * CHUNK_STEPS, last * CHUNK_STEPS, num_stages=NUM_STAGES):
        unit = step // CHUNK_STEPS
        tile = unit // N_CHUNKS
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP)
        k0 = (step - tile * (N_CHUNKS * CHUNK_STEPS)) * BLOCK_K
        if TMA:
            a = a_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0]).T
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
            rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
            a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + offs_k)[None, :])
            w = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + offs_k)[:, None])
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if step % CHUNK_STEPS == CHUNK_STEPS - 1:  # the chunk's sum is done
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            part_rows = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            chunk = unit - tile * N_CHUNKS
            tile_start = tile * N_CHUNKS
            if tile_start >= first:  # this run holds the tile from chunk 0
                total += acc
                if chunk == N_CHUNKS - 1:  # ... to its end: no partials
                    if HAS_BIAS:
                        total += tl.load(bias_ptr + tl.where(offs_n < N, offs_n, 0)).to(tl.float32)[None, :]
                    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
                    tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=out_mask)
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                elif unit == last - 1:  # ... up to the run's end: park the prefix sum
                    tl.store(part_ptr + chunk.to(tl.int64) * M * N + part_rows, total, mask=out_mask)
                    _cta_barrier(chunk, INTERPRET)  # every thread's partial is stored before the arrival is counted
                    arrived = tl.atomic_add(counters_ptr + tile, chunk + 1, sem="acq_rel", scope="gpu")
                    if arrived + chunk + 1 == N_CHUNKS:
                        _stream_merge(part_ptr, bias_ptr, c_ptr, counters_ptr, M, N, stride_cm, tile, chunk, offs_m,
                                      offs_n, BLOCK_M, BLOCK_N, N_CHUNKS, HAS_BIAS)  # fmt: skip
            else:  # a tile begun by an earlier run: park this chunk alone
                tl.store(part_ptr + chunk.to(tl.int64) * M * N + part_rows, acc, mask=out_mask)
                _cta_barrier(chunk, INTERPRET)
                arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
                if arrived + 1 == N_CHUNKS:
                    # The prefix: chunks 0 ... the end of the run that began the tile (its owner
                    # is the program p with first(p) <= tile_start < first(p + 1)).
                    owner = ((tile_start.to(tl.int64) + 1) * programs - 1) // units
                    owner_last = ((owner + 1) * units // programs).to(tl.int32)
                    prefix_chunk = tl.minimum(owner_last, tile_start + N_CHUNKS) - tile_start - 1
                    _stream_merge(part_ptr, bias_ptr, c_ptr, counters_ptr, M, N, stride_cm, tile, prefix_chunk, offs_m,
                                  offs_n, BLOCK_M, BLOCK_N, N_CHUNKS, HAS_BIAS)  # fmt: skip
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base and row stride (else the pointer loads run)."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # TRITON_INTERPRET on CPU: any value works


def _smem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) or 99 * 1024
    return 1 << 30


class BatchInvariantMatmul:
    """The deterministic-mode linear of one model on Triton (`linear` is what
    `LlamaForCausalLM.set_deterministic` installs): owns the arrival counters of split launches,
    allocated here when the device is known (else on the first call), so that every CUDA graph
    captures this same zeroed buffer (each split launch leaves it zeroed)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._counters: torch.Tensor | None = None
        if device is not None:
            self._arrival_counters(torch.device(device))

    def _arrival_counters(self, device: torch.device) -> torch.Tensor:
        if self._counters is None or self._counters.device != device:
            self._counters = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
        return self._counters

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
        tiles: MatmulTiles | None = None, split: bool | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x [..., K] @ weight [N, K]^T (+ bias) -> [..., N] in x's dtype, each row computed the
        same way whatever the number of rows. `tiles` / `split` override the M-bucket choice
        (tests and the device probe check that they change no bits)."""
        lead = x.shape[:-1]
        a = x.reshape(-1, x.shape[-1])
        if a.stride(-1) != 1:
            a = a.contiguous()
        if weight.stride(-1) != 1:
            weight = weight.contiguous()
        M, K = a.shape
        N = weight.shape[0]
        c = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M == 0:
            return c.view(*lead, N)
        launch = plan_launch(
            M, N, K, _dtype_name(weight.dtype), num_sms=_num_sms(x.device), smem_bytes=_smem_bytes(x.device),
            elem_bytes=weight.element_size(), max_split_tiles=MAX_SPLIT_TILES, tiles=tiles, split=split,
        )  # fmt: skip
        if launch.split:
            part = torch.empty(launch.order.num_chunks(K), M, N, dtype=torch.float32, device=x.device)
            counters = self._arrival_counters(x.device)
        else:
            part = counters = c  # unused
        order, tiles = launch.order, launch.tiles
        step_k = tiles.step_k(order)
        bias_arg = bias if bias is not None else weight
        if tiles.kernel == "nested":
            _matmul_kernel[launch.grid](
                a, weight, bias_arg, c, part, counters, M, N, K, a.stride(0), weight.stride(0), c.stride(0),
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=step_k, CHUNK_STEPS=order.chunk // step_k,
                GROUP=GROUP_M, SPLIT=launch.split, HAS_BIAS=bias is not None, IEEE=weight.dtype == torch.float32,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )  # fmt: skip
            return c.view(*lead, N)
        tma = tiles.kernel.endswith("_tma") and _tma_ok(a) and _tma_ok(weight)
        a_desc = TensorDescriptor.from_tensor(a, [tiles.block_m, step_k]) if tma else a
        w_desc = TensorDescriptor.from_tensor(weight, [tiles.block_n, step_k]) if tma else weight
        if tiles.kernel == "stream_tma":
            _matmul_kernel_stream[launch.grid](
                a, weight, a_desc, w_desc, bias_arg, c, part, counters, M, N, K, a.stride(0), weight.stride(0), c.stride(0),
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=step_k, CHUNK_STEPS=order.chunk // step_k,
                N_CHUNKS=order.num_chunks(K), GROUP=GROUP_M, HAS_BIAS=bias is not None,
                IEEE=weight.dtype == torch.float32, TMA=tma, NUM_STAGES=tiles.num_stages, INTERPRET=_INTERPRET,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )  # fmt: skip
        else:
            _matmul_kernel_flat[launch.grid](
                a, weight, a_desc, w_desc, bias_arg, c, part, counters, M, N, K, a.stride(0), weight.stride(0), c.stride(0),
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=step_k, CHUNK_STEPS=order.chunk // step_k,
                GROUP=GROUP_M, SPLIT=launch.split, HAS_BIAS=bias is not None, IEEE=weight.dtype == torch.float32,
                TMA=tma, NUM_STAGES=tiles.num_stages, PERSISTENT=tiles.kernel == "persistent_tma",
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )  # fmt: skip
        return c.view(*lead, N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A one-off batch-invariant linear (its own counters; models use BatchInvariantMatmul)."""
    return BatchInvariantMatmul().linear(x, weight, bias)

"""Batch-invariant matmul on Triton: the GPU half of deterministic mode (`--deterministic`).

cuBLAS picks its kernel, tile shape and split-K from the problem size, so the same row of an
activation matrix is reduced in another order when the batch has 1 row than when it has 64, or
4096 (a prefill). Here one kernel with one fixed configuration per dtype computes every linear
layer: each output element is one fp32 accumulator that walks K in BLOCK_K steps from 0 to K,
in the same order and with the same instructions whatever M is. No split-K, no autotuning, and M
is not a specialization key (`do_not_specialize`), so every M runs the same binary.

The configuration is the one Thinking Machines' batch_invariant_ops uses on H100 for bf16
(128 x 128 x 64 tiles, 8 warps, 3 stages; github.com/thinking-machines-lab/batch_invariant_ops),
with grouped tile order for L2 reuse. fp32 runs IEEE (not TF32) dots, like torch's default.

Only imported on a CUDA device (or under TRITON_INTERPRET=1): CI has no Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# dtype -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Changing one changes the bits
# (not the guarantee): every M must use the same entry.
CONFIGS = {
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float16: (128, 128, 64, 8, 3),
    torch.float32: (128, 128, 32, 8, 3),
}
GROUP_M = 8


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    a_ptr, w_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """c[M, N] = a[M, K] @ w[N, K]^T (+ bias): one program per output tile, K walked in order.
    a's and w's last dimension must be contiguous."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP row tiles sweep the column tiles together (the weight tiles stay in L2).
    per_group = GROUP * num_pid_n
    first_m = (pid // per_group) * GROUP
    size_m = tl.minimum(num_pid_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns read row/column 0 (always valid) and are never stored.
    rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias) -> [..., N] in x's dtype, each row computed the same
    way whatever the number of rows."""
    lead = x.shape[:-1]
    a = x.reshape(-1, x.shape[-1])
    if a.stride(-1) != 1:
        a = a.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M, K = a.shape
    N = weight.shape[0]
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        block_m, block_n, block_k, warps, stages = CONFIGS[weight.dtype]
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _matmul_kernel[grid](
            a, weight, bias if bias is not None else weight, c, M, N, K, a.stride(0), weight.stride(0), c.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP=GROUP_M,
            HAS_BIAS=bias is not None, IEEE=weight.dtype == torch.float32, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return c.view(*lead, N)

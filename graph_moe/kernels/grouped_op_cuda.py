"""The CUDA kernels of `graph_moe::grouped_mm` (grouped_op.py): Triton, any float dtype, no host sync.

    grouped_rows(x, w, offs)            y[rows of g] = x[rows of g] @ w[g]        (S, K) x (G, K, N) -> (S, N)
    grouped_weight_grad(x, grad, offs)  out[g] = x[rows of g]^T @ grad[rows of g] (S, K) x (S, N) -> (G, K, N)

What takes this op is what torch._grouped_mm cannot take under torch.compile: PEFT's float32 adapters (its default)
on a bf16 model, float32 and float16 models, and rows that are not 16-byte units. Its CPU kernel runs one matmul per
group from offsets read on the host; on a GPU that read is a sync per GEMM, and PEFT's default LoRA made a
4-layer Qwen3-30B-A3B-shaped training step take 190 ms on an H200 (`graph-moe bench step`). Here the
groups' row ranges are found on the GPU, so one launch does every group and CUDA graphs can capture it.

Both kernels mask every edge (any K, N, rows per group, empty groups) and accumulate in float32. float32 inputs are
multiplied as torch's float32 matmuls are set to (`torch.get_float32_matmul_precision()`): "highest" (the default)
as three TF32 products (Triton's "tf32x3": float32's accuracy on tensor cores), "high"/"medium" as one.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, offs_ptr, y_ptr, M, N, K, G, stride_xm, stride_xk, stride_wg, stride_wk, stride_wn,
                     stride_ym, stride_yn, GROUPS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """One (row tile, column tile) of the sorted rows. A tile that spans groups multiplies each group's rows by
        that group's weight (the other rows masked to zero); rows past the last offset get zeros."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        gs = tl.arange(0, GROUPS_POW2)
        ends = tl.load(offs_ptr + gs, mask=gs < G, other=2147483647)
        first_row = tl.program_id(0) * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, M) - 1
        first_group = tl.sum((ends <= first_row).to(tl.int32), 0)
        last_group = tl.minimum(tl.sum((ends <= last_row).to(tl.int32), 0), G - 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(first_group, last_group + 1):
            start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
            end = tl.load(offs_ptr + g)
            if end > start:  # empty groups inside the tile's range cost nothing (a skewed router leaves many)
                mine = (rows >= start) & (rows < end)
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
                                mask=mine[:, None] & (ks[None, :] < K), other=0.0)
                    b = tl.load(w_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk
                                + cols[None, :] * stride_wn, mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def _weight_grad_kernel(x_ptr, grad_ptr, offs_ptr, out_ptr, K, N, stride_xm, stride_xk, stride_gm, stride_gn,
                            stride_og, stride_ok, stride_on, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One (group, K tile, N tile) of the weight gradient: the group's rows reduced BLOCK_M at a time."""
        g = tl.program_id(0)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        end = tl.load(offs_ptr + g)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            mine = rows < end
            xt = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None] * stride_xk,
                         mask=(ks[:, None] < K) & mine[None, :], other=0.0)
            gr = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn,
                         mask=mine[:, None] & (cols[None, :] < N), other=0.0)
            acc = tl.dot(xt, gr, acc, input_precision=PRECISION)
        tl.store(out_ptr + g.to(tl.int64) * stride_og + ks[:, None] * stride_ok + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


MAX_GROUPS = 4096  # the row kernel holds every group's end offset in one block of registers


def usable(x: Tensor, w: Tensor, offs: Tensor) -> bool:
    """Whether these operands can take the Triton kernels: one CUDA device, one float dtype, at most MAX_GROUPS."""
    return (triton is not None and x.is_cuda and w.device == x.device == offs.device and w.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and offs.numel() <= MAX_GROUPS)


def _precision(dtype: torch.dtype) -> str | None:
    if dtype != torch.float32:
        return None
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _block(size: int, largest: int) -> int:
    """A power-of-two tile edge between 16 (tl.dot's least) and `largest`, no larger than `size` needs."""
    return max(16, min(largest, triton.next_power_of_2(max(size, 1))))


def grouped_rows(x: Tensor, w: Tensor, offs: Tensor, config=None) -> Tensor:
    """config: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), or None for the default."""
    rows, k = x.shape
    groups, _, n = w.shape
    y = x.new_empty(rows, n)
    if rows == 0:
        return y
    wide = 32 if x.dtype == torch.float32 else 64  # float32 tiles take twice the registers and shared memory
    # 64 deep along K in every dtype: 10-25% faster than 32 at float32 LoRA shapes on an H200
    # (benchmarks/records/h200_torch2.11_fp32_grouped_op_tiles.json)
    block_m, block_n, block_k, warps, stages = config or (64, _block(n, 2 * wide), _block(k, 64), 4, 3)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    _rows_kernel[grid](x, w, offs, y, rows, n, k, groups, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                       w.stride(2), y.stride(0), y.stride(1), GROUPS_POW2=triton.next_power_of_2(groups),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x.dtype),
                       num_warps=warps, num_stages=stages)
    return y


def grouped_weight_grad(x: Tensor, grad: Tensor, offs: Tensor, groups: int, config=None) -> Tensor:
    """config: (BLOCK_M, BLOCK_K, BLOCK_N, warps, stages), or None for the default."""
    k, n = x.shape[-1], grad.shape[-1]
    out = x.new_empty(groups, k, n)
    wide = 32 if x.dtype == torch.float32 else 64
    block_m, block_k, block_n, warps, stages = config or (2 * wide, _block(k, 2 * wide), _block(n, 2 * wide), 4, 3)
    grid = (groups, triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _weight_grad_kernel[grid](x, grad, offs, out, k, n, x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
                              out.stride(0), out.stride(1), out.stride(2), BLOCK_M=block_m, BLOCK_K=block_k,
                              BLOCK_N=block_n, PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages)
    return out

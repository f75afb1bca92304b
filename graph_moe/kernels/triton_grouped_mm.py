"""A persistent Triton grouped GEMM over a range of groups, with the row tiles found from the offsets on the GPU.

    run_groups(x, b, offs, y, first, last, config):
        y[rows of group g] = x[rows] @ b[g - first]   for the groups first..last-1

`b` is any strided (G, K, N) view (an (E, out, in) stack transposed, or not). torch._grouped_mm (CUTLASS) cannot do
two things this kernel does: take a range of groups whose rows start somewhere only the GPU knows (grouped_mm_4bit.py:
one chunk of dequantized experts at a time), and run row tiles narrower than 128 (grouped_mm_few_rows.py: at 4 to 128
rows per expert its tiles are mostly empty, and the GEMM is bound by reading the weights).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _kernel(x_ptr, w_ptr, offs_ptr, y_ptr, N, K, FIRST, LAST, stride_x, stride_y, stride_wg, stride_wn, stride_wk,
                GROUPS_POW2: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
        """y[rows of group g] = x[rows] @ B[g] for the groups FIRST..LAST-1, B[g][k, n] at w + (g - FIRST) *
        stride_wg + n * stride_wn + k * stride_wk. Persistent: the programs take the range's (row tile, column
        tile) pairs in turn; the row tiles are found from the offsets on the GPU (no host sync)."""
        g = tl.arange(0, GROUPS_POW2)
        mine_range = (g >= FIRST) & (g < LAST)
        ends = tl.load(offs_ptr + g, mask=mine_range, other=0)
        starts = tl.load(offs_ptr + g - 1, mask=mine_range & (g >= 1), other=0)
        tiles = tl.where(mine_range, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        tile_ends = tl.cumsum(tiles, 0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        for t in range(tl.program_id(0), tl.sum(tiles, 0) * tiles_n, tl.num_programs(0)):
            pid_m = t // tiles_n  # consecutive tiles share one row tile (from L2)
            group = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
            mine = g == group
            first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
            rows = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
            in_group = rows < tl.sum(tl.where(mine, ends, 0), 0)
            cols = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            a_ptrs = x_ptr + tl.where(in_group, rows, 0).to(tl.int64)[:, None] * stride_x + ks[None, :]
            # A select on the columns hides their contiguity from Triton: where the weights are contiguous along
            # the columns (the transposed GEMM) its loads then go element by element, 10x slower.
            cols_in = cols if EVEN_N else tl.where(cols < N, cols, 0)
            b_ptrs = (w_ptr + (group - FIRST).to(tl.int64) * stride_wg + ks[:, None] * stride_wk
                      + cols_in[None, :] * stride_wn)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for _ in range(0, tl.cdiv(K, BLOCK_K)):  # K % BLOCK_K == 0: no masks along K
                acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * stride_wk
            y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=in_group[:, None] & (cols[None, :] < N))


MAX_GROUPS = 4096  # the groups' offsets are held in one block of registers


def unsupported(x: Tensor, k: int, groups: int, block_k: int) -> str | None:
    """Why `run_groups` cannot take rows `x` reducing over `k` in `groups` groups with tiles `block_k` deep, or
    None where it can (Triton installed, bf16 rows with contiguous columns, K a multiple of the tile)."""
    return ("Triton is not installed" if triton is None else
            "the rows are not bf16 with contiguous rows" if x.dtype != torch.bfloat16 or x.stride(-1) != 1 else
            f"{k} (the reduced dim) is not a multiple of {block_k}" if k % block_k else
            f"more than {MAX_GROUPS} experts" if groups > MAX_GROUPS else None)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def run_groups(x: Tensor, b: Tensor, offs: Tensor, y: Tensor, first: int, last: int, config,
               programs_per_sm: int = 1) -> None:
    """y[rows of group g] = x[rows] @ b[g - first] for the groups first..last-1 (x and y with contiguous rows, K a
    multiple of BLOCK_K; offs int32 end offsets of all groups). config: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    block_m, block_n, block_k, warps, stages = config
    k, n = b.shape[-2:]
    programs = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    _kernel[(programs * programs_per_sm,)](
        x, b, offs, y, n, k, first, last, x.stride(0), y.stride(0), b.stride(0), b.stride(2), b.stride(1),
        GROUPS_POW2=triton.next_power_of_2(offs.numel()), EVEN_N=n % block_n == 0, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)

"""The router's top-k over each token's expert scores in one pass over the scores, without ATen's top-k.

ATen's CUDA top-k (a radix select per row, then a sort of the k winners) took 0.12-0.14 ms for 16384 tokens x 128
experts on an H200, 4-5% of the rewritten layer's forward, for 8 MB of scores.

    router_topk(scores, k)   torch.topk(scores, k) (largest, sorted): (values, indices); gradient: the values'
                             gradients scattered to their indices, as topk's

On CUDA with Triton it is one Triton kernel (`_topk_kernel`): each program holds a block of rows in registers and takes
k arg-max steps over them, each winner then masked to -inf. Elsewhere it is the same k steps as torch ops
(`_argmax_steps`). Both sit in the body AOTAutograd traces into, so Inductor launches the kernel from its own code.
The first form was the torch ops on CUDA too, which Inductor fuses with the softmax into one looped reduction kernel
(39 us), but compiling that kernel took ~10 s per graph on an H200 host, so it was opt-in; the Triton kernel is
compiled once per process (and cached on disk by Triton), so the rewrite is on by default (`router_topk=True`).

Equal values: each step takes the lowest index of the row's maximum (torch.max's documented rule), so ties at the
k-th value go to the lowest indices. ATen's CUDA kernel does the same (it writes the values equal to the k-th in index
order); its CPU kernel chooses otherwise, so the pass replaces top-k only on the devices in `DEVICES`, where the
chosen experts are the eager ones. The rule is checked on the GPU by tests/kernels/test_router_topk.py's CUDA tests.
Scores from a softmax only: they are never -inf, so a masked winner can never tie a real score. A NaN counts as the
largest score, as in torch.topk, so the chosen index is always a real expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .traced_bodies import run_eagerly, traced_into

# Devices whose torch.topk breaks ties as router_topk does (lowest index first); the pass rewrites top-k there only.
DEVICES = {"cuda"}
MAX_EXPERTS = 1024  # scores per row: k passes over a row stay cheap
MAX_K = 16


try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # CPU-only installs
    triton = None


def _argmax_steps(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, indices = [], []
    left = scores
    experts = torch.arange(scores.shape[-1], device=scores.device)
    for step in range(k):
        value, index = left.max(-1, keepdim=True)
        values.append(value)
        indices.append(index)
        if step + 1 < k:  # a select, not a scatter: Inductor inlines it into the next step's reduction
            left = torch.where(experts == index, float("-inf"), left)
    return torch.cat(values, -1), torch.cat(indices, -1)


if triton is not None:

    @triton.jit
    def _topk_kernel(scores_ptr, values_ptr, indices_ptr, rows, experts, stride_row,
                     K: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_EXPERTS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_EXPERTS)
        live = (row < rows)[:, None] & (cols < experts)[None, :]
        scores = tl.load(scores_ptr + row[:, None] * stride_row + cols[None, :], mask=live, other=float("-inf"))
        scores = scores.to(tl.float32)  # exact for bf16 and fp16 scores
        left = tl.where(scores != scores, float("inf"), scores)  # NaN: the largest, as torch.topk ranks it
        for step in tl.static_range(K):
            best = tl.max(left, axis=1)
            index = tl.min(tl.where(left == best[:, None], cols[None, :], BLOCK_EXPERTS), axis=1)
            winner = cols[None, :] == index[:, None]
            value = tl.sum(tl.where(winner, scores, 0.0), axis=1)  # the score itself (a NaN stays NaN)
            out = row * K + step
            tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=row < rows)
            tl.store(indices_ptr + out, index.to(tl.int64), mask=row < rows)
            left = tl.where(winner, float("-inf"), left)


def _uses_triton(scores: Tensor) -> bool:
    return triton is not None and scores.is_cuda and scores.shape[-1] <= MAX_EXPERTS


def _triton_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    experts = scores.shape[-1]
    flat = scores.reshape(-1, experts)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    values = scores.new_empty((*scores.shape[:-1], k))
    indices = torch.empty((*scores.shape[:-1], k), dtype=torch.int64, device=scores.device)
    block_experts = triton.next_power_of_2(experts)
    block_rows = max(1, min(64, 4096 // block_experts))  # about 4096 scores in registers per program
    wrap_triton(_topk_kernel)[((rows + block_rows - 1) // block_rows,)](
        flat, values, indices, rows, experts, flat.stride(0), K=k, BLOCK_ROWS=block_rows,
        BLOCK_EXPERTS=block_experts)
    return values, indices


def _router_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return _triton_topk(scores, k) if _uses_triton(scores) else _argmax_steps(scores, k)


@torch.library.custom_op("graph_moe::router_topk", mutates_args=())
def router_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(scores, k, dim=-1) for scores that are never -inf, ties to the lowest index."""
    return run_eagerly(_router_topk, scores, k)


def _router_topk_backward(ctx, grad_values, grad_indices):
    (indices,) = ctx.saved_tensors
    return torch.zeros(ctx.shape, dtype=grad_values.dtype, device=grad_values.device).scatter(
        -1, indices, grad_values), None


def _router_topk_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.shape = inputs[0].shape


router_topk.register_autograd(_router_topk_backward, setup_context=_router_topk_setup)
traced_into(router_topk, _router_topk)


__all__ = ["router_topk", "DEVICES", "MAX_EXPERTS", "MAX_K"]

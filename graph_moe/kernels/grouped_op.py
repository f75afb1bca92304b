"""Grouped GEMM for what the compiled torch._grouped_mm rejects (float32, float16, rows not in 16-byte units).

torch._grouped_mm's fake kernel accepts only bfloat16, so a float32 loop (or float32 LoRA adapters,
which PEFT keeps by default) cannot use it under torch.compile. `graph_moe::grouped_mm` is an opaque
custom op with a fake kernel and autograd. On CUDA with Triton its kernels find the groups' rows on the GPU
(grouped_op_cuda.py: no host sync); elsewhere each group runs as one matmul from offsets read on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import grouped_op_cuda


def _groups(offs: Tensor):
    start = 0
    for g, end in enumerate(offs.tolist()):
        yield g, start, end
        start = end


@torch.library.custom_op("graph_moe::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x (S, K) rows sorted by group, w (G, K, N), offs int32 end offsets -> (S, N)."""
    if grouped_op_cuda.usable(x, w, offs):
        return grouped_op_cuda.grouped_rows(x, w, offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for g, start, end in _groups(offs):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
    return out


@grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("graph_moe::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: Tensor, grad: Tensor, offs: Tensor, num_groups: int) -> Tensor:
    """Per group x[rows]^T @ grad[rows] -> (G, K, N); groups without rows get zeros."""
    if grouped_op_cuda.usable(x, grad, offs):
        return grouped_op_cuda.grouped_weight_grad(x, grad, offs, num_groups)
    out = x.new_zeros(num_groups, x.shape[-1], grad.shape[-1])
    for g, start, end in _groups(offs):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[g])
    return out


@grouped_mm_weight_grad.register_fake
def _(x, grad, offs, num_groups):
    return x.new_empty(num_groups, x.shape[-1], grad.shape[-1])


def _setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    gx = grouped_mm(grad, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    gw = grouped_mm_weight_grad(x, grad, offs, w.shape[0]) if ctx.needs_input_grad[1] else None
    return gx, gw, None


grouped_mm.register_autograd(_backward, setup_context=_setup)

"""The SwiGLU activation with its routing weight, silu(gate) * up * w, as one op whose backward reads each row once.

The grouped GEMM gives gate and up side by side, gu = [gate | up] (rows, 2 x intermediate); the rows are then scaled by
their routing weight w (rows, 1) before the down projection (passes/early_scale.py). Left to autograd, the backward is
two kernels over the same inputs: the routing weight's gradient (a reduction over the intermediate dim) and the gate/up
gradient, which Inductor writes as a pointwise `cat` over (rows, 2 x intermediate) that evaluates both halves'
masked loads and silu in every element: 120 + 52 us at Qwen3-30B-A3B, 4096 tokens, H200, where the bytes take ~60.

    swiglu_scaled(gu, w)                       silu(gate) * up * w; its gradient is swiglu_scaled_backward's
    swiglu_scaled_backward(gu, w, grad)        (d gu, d w): on CUDA one Triton program per row reads gate, up and
                                               the row's gradient once and writes both halves and w's gradient

Both are custom ops whose bodies AOTAutograd traces into (traced_bodies.py): the forward stays plain torch ops for
Inductor to fuse, and the backward's Triton kernel is launched by Inductor's own code (no Python dispatch per call).
Without CUDA or Triton the backward is the same formula in torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .traced_bodies import run_eagerly, traced_into

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # CPU-only installs
    triton = None


def _swiglu_scaled(gu: Tensor, w: Tensor) -> Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up * w


@torch.library.custom_op("graph_moe::swiglu_scaled", mutates_args=())
def swiglu_scaled(gu: Tensor, w: Tensor) -> Tensor:
    """silu(gate) * up * w with gu = [gate | up] (rows, 2 x inter) and w (rows, 1): (rows, inter)."""
    return _swiglu_scaled(gu, w)


def _backward_formula(gu: Tensor, w: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """In float32, rounded once at the end, as Inductor computes a fused kernel."""
    gate, up = gu.float().chunk(2, dim=-1)
    grad = grad.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_w = (grad * (silu * up)).sum(-1, keepdim=True)
    d_h = grad * w.float()
    d_gate = d_h * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, d_h * silu], dim=-1).to(gu.dtype), d_w.to(w.dtype)


if triton is not None:

    @triton.jit
    def _backward_kernel(gu_ptr, w_ptr, grad_ptr, d_gu_ptr, d_w_ptr, inter, stride_gu, stride_grad, stride_d_gu,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_w = tl.sum(grad * silu * up, axis=0)
        d_h = grad * w
        d_gate = d_h * up * sig * (1 + gate * (1 - sig))
        out = d_gu_ptr + row * stride_d_gu + cols
        tl.store(out, d_gate.to(d_gu_ptr.dtype.element_ty), mask=mask)
        tl.store(out + inter, (d_h * silu).to(d_gu_ptr.dtype.element_ty), mask=mask)
        tl.store(d_w_ptr + row, d_w.to(d_w_ptr.dtype.element_ty))


def _uses_triton(gu: Tensor, w: Tensor, grad: Tensor) -> bool:
    return (triton is not None and gu.is_cuda and gu.stride(-1) == 1 and grad.stride(-1) == 1
            and w.is_contiguous() and gu.shape[-1] // 2 <= 8192)


def _swiglu_scaled_backward(gu: Tensor, w: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    if not _uses_triton(gu, w, grad):
        return _backward_formula(gu, w, grad)
    rows, inter = grad.shape
    d_gu, d_w = torch.empty_like(gu, memory_format=torch.contiguous_format), torch.empty_like(w)
    block = triton.next_power_of_2(inter)
    wrap_triton(_backward_kernel)[(rows,)](gu, w, grad, d_gu, d_w, inter, gu.stride(0), grad.stride(0),
                                           d_gu.stride(0), BLOCK=block)
    return d_gu, d_w


@torch.library.custom_op("graph_moe::swiglu_scaled_backward", mutates_args=())
def swiglu_scaled_backward(gu: Tensor, w: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(gradient of gu, gradient of w) of swiglu_scaled for the output gradient `grad`."""
    return run_eagerly(_swiglu_scaled_backward, gu, w, grad)


def _backward(ctx, grad):
    gu, w = ctx.saved_tensors
    return torch.ops.graph_moe.swiglu_scaled_backward(gu, w, grad)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


swiglu_scaled.register_autograd(_backward, setup_context=_setup)
traced_into(swiglu_scaled, _swiglu_scaled)
traced_into(swiglu_scaled_backward, _swiglu_scaled_backward)


__all__ = ["swiglu_scaled", "swiglu_scaled_backward"]

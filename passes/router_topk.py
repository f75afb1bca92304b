"""The router's top-k as k arg-max steps over each token's expert scores, which Inductor fuses into one kernel.

ATen's CUDA top-k (a radix select per row, then a sort of the k winners) took 0.14 ms for 16384 tokens x 128 experts
on an H200, 5% of the rewritten layer's forward, for 8 MB of scores. The same selection as k max-with-index
reductions over the row, each winner then masked to -inf, is plain torch ops Inductor fuses with the softmax before
it into one reduction kernel over each token's row (39 us).

    router_topk(scores, k)   torch.topk(scores, k) (largest, sorted): (values, indices); gradient: the values'
                             gradients scattered to their indices, as topk's

Off unless asked for (`router_topk=True` in graph_moe.make_backend, compile or inductor_pass): Inductor's compile of
that kernel took ~10 s more per graph on an H200 host (one decoder layer, caches off: 29.8 -> 40.4 s), for 0.1 ms a
layer's forward at 16384 tokens and nothing measurable at 4096: worth it for long runs at many tokens per step.

Equal values: each step takes the first index of the row's maximum (torch.max's documented rule), so ties at the
k-th value go to the lowest indices. ATen's CUDA kernel does the same (it writes the values equal to the k-th in index
order); its CPU kernel chooses otherwise, so the pass replaces top-k only on the devices in `DEVICES`, where the
chosen experts are the eager ones. The rule is checked on the GPU by tests/test_router_topk.py's CUDA test.
Scores from a softmax only: they are never -inf, so a masked winner can never tie a real score.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from .ops import example_value
from .row_order import _traced_into

# Devices whose torch.topk breaks ties as router_topk does (lowest index first); the pass rewrites top-k there only.
DEVICES = {"cuda"}
MAX_EXPERTS = 1024  # scores per row: k passes over a row stay cheap
MAX_K = 16


def _router_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
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


@torch.library.custom_op("graph_moe::router_topk", mutates_args=())
def router_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(scores, k, dim=-1) for scores that are never -inf, ties to the lowest index."""
    return _router_topk(scores, k)


def _router_topk_backward(ctx, grad_values, grad_indices):
    (indices,) = ctx.saved_tensors
    return torch.zeros(ctx.shape, dtype=grad_values.dtype, device=grad_values.device).scatter(
        -1, indices, grad_values), None


def _router_topk_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.shape = inputs[0].shape


router_topk.register_autograd(_router_topk_backward, setup_context=_router_topk_setup)
_traced_into(router_topk, _router_topk)

_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, "softmax")


def replace_router_topk(ids: fx.Node, fake_mode) -> bool:
    """Where the routed expert ids are `torch.topk(softmax(logits), k)[1]` over the last dim, on a device in
    DEVICES, with k <= MAX_K of at most MAX_EXPERTS scores: the top-k node becomes router_topk. Returns whether it
    did."""
    if not (ids.op == "call_function" and ids.target is operator.getitem and ids.args[1] == 1):
        return False
    topk = ids.args[0]
    if not (isinstance(topk, fx.Node) and (topk.target is torch.topk or (topk.op == "call_method"
                                                                          and topk.target == "topk"))):
        return False
    names = ("input", "k", "dim", "largest", "sorted")
    bound = dict(zip(names, topk.args)) | dict(topk.kwargs)
    scores, k = bound.get("input"), bound.get("k")
    if not (isinstance(scores, fx.Node) and isinstance(k, int) and 1 <= k <= MAX_K
            and bound.get("largest", True) is True and bound.get("sorted", True) is True):
        return False
    val = example_value(scores)
    if not (isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.device.type in DEVICES
            and bound.get("dim", -1) in (-1, val.dim() - 1) and isinstance(val.shape[-1], int)
            and k <= val.shape[-1] <= MAX_EXPERTS):
        return False
    if not (scores.target in _SOFTMAX and _softmax_dim(scores) in (-1, val.dim() - 1)):
        return False
    with topk.graph.inserting_before(topk):
        new = topk.graph.call_function(torch.ops.graph_moe.router_topk, (scores, k))
    with fake_mode:
        new.meta["example_value"] = torch.ops.graph_moe.router_topk(val, k)
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in topk.meta:
            new.meta[key] = topk.meta[key]
    topk.replace_all_uses_with(new)
    topk.graph.erase_node(topk)
    return True


def _softmax_dim(node: fx.Node):
    """F.softmax(x, dim), torch.softmax(x, dim) and x.softmax(dim) all take dim second."""
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)

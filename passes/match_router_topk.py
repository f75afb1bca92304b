"""Where the routed expert ids are the top-k of a softmax, the top-k node becomes graph_moe::router_topk
(graph_moe/kernels/router_topk.py): one Triton kernel on CUDA instead of ATen's radix select, choosing the same experts.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from graph_moe.kernels import router_topk as router_topk_op

from .ops import example_value

_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, "softmax")


def replace_router_topk(ids: fx.Node, fake_mode) -> bool:
    """Where the routed expert ids are `torch.topk(softmax(logits), k)[1]` over the last dim, on a device in the
    kernel's DEVICES, with k <= MAX_K of at most MAX_EXPERTS scores: the top-k node becomes router_topk. Returns
    whether it did."""
    if not (ids.op == "call_function" and ids.target is operator.getitem and ids.args[1] == 1):
        return False
    topk = ids.args[0]
    if not (isinstance(topk, fx.Node) and (topk.target is torch.topk or (topk.op == "call_method"
                                                                          and topk.target == "topk"))):
        return False
    names = ("input", "k", "dim", "largest", "sorted")
    bound = dict(zip(names, topk.args)) | dict(topk.kwargs)
    scores, k = bound.get("input"), bound.get("k")
    if not (isinstance(scores, fx.Node) and isinstance(k, int) and 1 <= k <= router_topk_op.MAX_K
            and bound.get("largest", True) is True and bound.get("sorted", True) is True):
        return False
    val = example_value(scores)
    if not (isinstance(val, torch.Tensor) and val.dtype.is_floating_point
            and val.device.type in router_topk_op.DEVICES  # read at each call: tests extend it
            and bound.get("dim", -1) in (-1, val.dim() - 1) and isinstance(val.shape[-1], int)
            and k <= val.shape[-1] <= router_topk_op.MAX_EXPERTS):
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


__all__ = ["replace_router_topk"]

"""Where the rewritten rows are a SwiGLU scaled by the routing weight, silu(gate) * up * w, with gate and up the two
halves of the fused gate+up GEMM: those nodes become one graph_moe::swiglu_scaled (graph_moe/kernels/swiglu.py), whose backward
reads each row once.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .ops import op_name


def swiglu_input(h: fx.Node, w: fx.Node):
    """(gu, the nodes from gu to h) when the rows `h`, just emitted and not used yet, are silu(gate) * up with
    gate, up = gu.chunk(2, -1) (the laid-out gate+up GEMM's output, rows x 2 x inter) and w (rows, 1) scales them,
    all in one float dtype; else None (the body stays as traced)."""
    def single_use(n):
        return isinstance(n, fx.Node) and len(n.users) == 1

    if h.users or op_name(h) != "mul" or len(h.args) != 2 or h.kwargs:
        return None
    silu, up = h.args
    if not (single_use(silu) and silu.target is F.silu and len(silu.args) == 1 and not silu.kwargs.get("inplace")):
        return None
    gate = silu.args[0]
    if not (single_use(gate) and single_use(up) and gate.target is operator.getitem and up.target is operator.getitem
            and gate.args[0] is up.args[0] and (gate.args[1], up.args[1]) == (0, 1)):
        return None
    halves = gate.args[0]
    if not (isinstance(halves, fx.Node) and len(halves.users) == 2 and halves.op == "call_method"
            and halves.target == "chunk"):
        return None
    chunks = halves.args[1] if len(halves.args) > 1 else halves.kwargs.get("chunks")
    dim = halves.args[2] if len(halves.args) > 2 else halves.kwargs.get("dim", 0)
    if not (chunks == 2 and dim in (-1, 1)):
        return None
    gu = halves.args[0]
    values = [n.meta.get("example_value") for n in (gu, w, h)]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return None
    gu_val, w_val, h_val = values
    if not (gu_val.dim() == 2 == w_val.dim() and gu_val.dtype == w_val.dtype == h_val.dtype
            and gu_val.dtype.is_floating_point):
        return None
    rows, width = gu_val.shape
    if not (isinstance(width, int) and width % 2 == 0 and statically_known_true(w_val.shape[0] == rows)
            and w_val.shape[1] == 1):  # one weight per row: the kernel reads w[row]
        return None
    return gu, [h, silu, gate, up, halves]


__all__ = ["swiglu_input"]

"""Per-expert weights stacked by one opaque op, so Inductor compiles one call instead of one copy per weight.

Trained experts without the grouped layout hold E separate weights per projection; the grouped GEMM needs them as
one (E, out, in) tensor, stacked every forward (and again in the backward, where the stack is recomputed).
Inductor lowers `torch.stack` of more than a few inputs into one copy kernel per input: 3 x 128 scheduler nodes
per forward at the Qwen3-30B-A3B shape, which dominated the compile of a trained layer. `graph_moe::stack_weights`
is `torch.stack` (one ATen cat kernel at run time) that Inductor calls as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("graph_moe::stack_weights", mutates_args=())
def stack_weights(tensors: list[Tensor]) -> Tensor:
    """torch.stack(tensors): (E, *shape) from E tensors of one shape."""
    return torch.stack(tensors)


@stack_weights.register_fake
def _(tensors):
    return tensors[0].new_empty(len(tensors), *tensors[0].shape)


def _backward(ctx, grad):
    return list(grad.unbind(0))


stack_weights.register_autograd(_backward)

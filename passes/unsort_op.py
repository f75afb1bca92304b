"""The grouped rows back in (token, slot) order: a gather forward, and a gather backward.

The rows come out of the grouped GEMMs sorted by expert (and padded per expert when adapters train). The combine
needs them by (token, slot) to add each token's k slots. Written as `rows[row_of_slot]` the forward is one gather
that Inductor fuses with the slot adds (read each row once, write each token once), but its autograd backward is
an index_put with accumulate: an atomic scatter-add into zeros. Written as a scatter the backward is a gather but
the forward writes and reads the (tokens * k, hidden) rows once more (0.26 ms at the Qwen3-30B-A3B shape, 16384
tokens, H200). The indices are a bijection between real rows and slots, so the backward is a gather too:
`graph_moe::unsort_rows` is both: a custom op with the backward registered here, whose body AOTAutograd traces
into (as `torch.library.triton_op` does), so Inductor sees plain torch ops and fuses them with their neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode


def _gather(rows: Tensor, row_of_slot: Tensor, slot_of_row: Tensor) -> Tensor:
    return rows[row_of_slot]


@torch.library.custom_op("graph_moe::unsort_rows", mutates_args=())
def unsort_rows(rows: Tensor, row_of_slot: Tensor, slot_of_row: Tensor) -> Tensor:
    """rows[row_of_slot]: (slots, *row) from (rows, *row). slot_of_row[p] is the slot that reads row p, or
    `slots` (past the end) for a padding row no slot reads."""
    return _gather(rows, row_of_slot, slot_of_row)


unsort_rows.register_fake(_gather)


@unsort_rows.register_torch_dispatch(FunctionalTensorMode)
def _decompose(mode, op, types, args, kwargs):
    """Under AOTAutograd (below autograd, where the backward above is already recorded): the body, traced."""
    with mode:
        return _gather(*args, **kwargs)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _backward(ctx, grad):
    (slot_of_row,) = ctx.saved_tensors
    slots = grad.shape[0]
    read = (slot_of_row < slots).view(-1, *[1] * (grad.dim() - 1))
    return torch.where(read, grad[slot_of_row.clamp_max(slots - 1)], 0), None, None


unsort_rows.register_autograd(_backward, setup_context=_setup_context)

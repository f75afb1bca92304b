"""Rows between token order and expert order: two gathers, each the other's gradient, so neither direction has an
atomic scatter-add.

The grouped GEMMs read the tokens' rows sorted by expert (each token k times, once per slot; padded per expert when
adapters train) and give rows in that order; the combine needs them back by (token, slot) to add each token's k
slots. As plain indexing, each gather's gradient is an index_put with accumulate (an atomic scatter-add into zeros):
the input gradient (tokens x hidden) from the rows, and the rows' gradient from the combine. Written as a scatter,
the combine's gradient became a gather, but its forward wrote and read the (tokens * k, hidden) rows once more (0.26
ms at the Qwen3-30B-A3B shape, 16384 tokens, H200). The indices are a bijection between real rows and (token, slot)
slots, so the gradient of either gather is a gather too:

    gather_token_rows(x, token_of_row, row_of_slot, k)   x[token_of_row];  gradient: for each token, its k slots' rows
                                                          gathered by row_of_slot and added
    unsort_rows(rows, row_of_slot, slot_of_row)          rows[row_of_slot]; gradient: grad[slot_of_row], zero for
                                                          padding rows
    add_slots(by_slot, dim)                              the k slots added; gradient: the token's, expanded (a view)

Where no row is padding (no trained weight groups along the rows), the two moves into expert order, x to rows and
the combine's gradient to rows, are written as scatters instead (`_scattered`): each token's row read once, in
order, and written to its k rows. Each is a custom op with the gradient registered here, whose body AOTAutograd
traces into (as `torch.library.triton_op` does), so Inductor sees plain torch ops and fuses them with their
neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .traced_bodies import traced_into


def _add_slots(by_slot: Tensor, dim: int) -> Tensor:
    k = by_slot.shape[dim]
    if not (isinstance(k, int) and 1 < k <= 16):
        return by_slot.sum(dim)
    total = by_slot.select(dim, 0)
    for j in range(1, k):
        total = total + by_slot.select(dim, j)
    return total


@torch.library.custom_op("graph_moe::add_slots", mutates_args=())
def add_slots(by_slot: Tensor, dim: int) -> Tensor:
    """Each token's k slots added: by_slot holds them along `dim`. Up to 16 slots as k slices (one coalesced
    elementwise kernel; Inductor adds bf16 slices in fp32 and rounds once, as a sum does): Inductor's reduction over
    the middle dim of (tokens, k, hidden) read at a fifth of the copy bandwidth (0.63 of 3.5 ms at Qwen3-30B-A3B,
    16384 tokens, H200). The gradient is the token's gradient expanded over the slots, a view: as the k slices'
    gradients (k zero-filled `select_backward`s added), Inductor wrote it out as a (tokens, k, hidden) tensor
    before the rows' gradient gathered from it (0.25 ms at 16384 tokens)."""
    return _add_slots(by_slot, dim)


def _add_slots_backward(ctx, grad):
    return grad.unsqueeze(ctx.dim).expand(ctx.shape), None


def _add_slots_setup(ctx, inputs, output):
    ctx.dim, ctx.shape = inputs[1], inputs[0].shape


add_slots.register_autograd(_add_slots_backward, setup_context=_add_slots_setup)
traced_into(add_slots, _add_slots)


def _scattered(values: Tensor, index: Tensor, rows, padding_rows: Tensor | None = None) -> Tensor:
    """(rows, *row) with row index[i] = values[i] (values broadcast to index's shape + row): written in the values'
    order, where a gather would read them in row order. `index` names every row but the padding rows, which are
    zeroed: `padding_rows` lists them, its unused entries `rows` (one extra row, cut off)."""
    shape = values.shape[index.dim():]
    if padding_rows is None:
        return values.new_empty((rows, *shape)).index_put((index,), values)
    out = values.new_empty((rows + 1, *shape)).index_put((index,), values)
    return out.index_put((padding_rows,), values.new_zeros(())).narrow(0, 0, rows)


def _unpadded(rows, slots) -> bool:
    return statically_known_true(rows == slots)


def _gather_token_rows(x: Tensor, token_of_row: Tensor, row_of_slot: Tensor, k: int,
                       padding_rows: Tensor | None = None) -> Tensor:
    rows = token_of_row.shape[0]
    if padding_rows is not None or _unpadded(rows, row_of_slot.shape[0]):
        # Each token's row written to its k rows, x read once in order. Gathered, each token's row is read k times
        # at random; with more tokens than L2 holds, mostly from memory (0.26 ms at 16384 tokens).
        return _scattered(x.unsqueeze(1), row_of_slot.view(-1, k), rows, padding_rows)
    return x[token_of_row]


@torch.library.custom_op("graph_moe::gather_token_rows", mutates_args=())
def gather_token_rows(x: Tensor, token_of_row: Tensor, row_of_slot: Tensor, k: int,
                      padding_rows: Tensor | None = None) -> Tensor:
    """x[token_of_row]: each grouped row's token. row_of_slot[t * k + j] is the row of token t's slot j (the rows
    no slot names, padding, get no gradient; they read some token, or zeros where `padding_rows` lists them)."""
    return _gather_token_rows(x, token_of_row, row_of_slot, k, padding_rows)


def _gather_token_rows_backward(ctx, grad):
    (row_of_slot,) = ctx.saved_tensors
    return _add_slots(grad[row_of_slot].unflatten(0, (-1, ctx.k)), 1), None, None, None, None


def _gather_token_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.k = inputs[3]


gather_token_rows.register_autograd(_gather_token_rows_backward, setup_context=_gather_token_rows_setup)
traced_into(gather_token_rows, _gather_token_rows)


def _unsort_rows(rows: Tensor, row_of_slot: Tensor, slot_of_row: Tensor, padding_rows: Tensor | None = None) -> Tensor:
    return rows[row_of_slot]


@torch.library.custom_op("graph_moe::unsort_rows", mutates_args=())
def unsort_rows(rows: Tensor, row_of_slot: Tensor, slot_of_row: Tensor,
                padding_rows: Tensor | None = None) -> Tensor:
    """rows[row_of_slot]: (slots, *row) from (rows, *row). slot_of_row[p] is the slot that reads row p, or
    `slots` (past the end) for a padding row no slot reads; `padding_rows`, if given, lists those (as
    `_scattered` takes them)."""
    return _unsort_rows(rows, row_of_slot, slot_of_row, padding_rows)


def _unsort_rows_backward(ctx, grad):
    row_of_slot, slot_of_row, padding_rows = ctx.saved_tensors
    slots, rows = grad.shape[0], slot_of_row.shape[0]
    if padding_rows is not None or _unpadded(rows, slots):  # written in slot order (as above), padding zeroed
        return _scattered(grad, row_of_slot, rows, padding_rows), None, None, None
    read = (slot_of_row < slots).view(-1, *[1] * (grad.dim() - 1))
    return torch.where(read, grad[slot_of_row.clamp_max(slots - 1)], 0), None, None, None


def _unsort_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2], inputs[3])


unsort_rows.register_autograd(_unsort_rows_backward, setup_context=_unsort_rows_setup)
traced_into(unsort_rows, _unsort_rows)

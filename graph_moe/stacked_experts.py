"""Expert weights of a 4.x ModuleList block as two stacked parameters: `graph_moe.install(model, stack_experts=True)`.

The grouped layout (layout.py) keeps `gate_up` (E, 2I, H) and `down` (E, H, I) as plain tensors and leaves each
expert's `weight` Parameter as a view into them: fine for frozen experts on one process. Two cases need the stacks to
BE the parameters:
- FSDP2: `fully_shard` replaces every parameter by a DTensor shard and all-gathers it per forward. Per-expert
  parameters leave the pass stacking the all-gathered (out, in) weights into (E, out, in) per forward (a copy of the
  layer's experts, again in backward). Stacked parameters, registered before `fully_shard`, are sharded along the
  expert dimension and all-gathered as the (E, out, in) tensors the grouped GEMMs read: no copy beyond FSDP's own.
- Trained experts (full fine-tuning): each expert weight's gradient would come from splitting the stack's gradient;
  one parameter per projection gets the grouped GEMM's gradient as it is.

Stacked, `block.graph_moe_experts` owns `gate_up` and `down` (nn.Parameter); each expert's gate/up/down Linear becomes
an `ExpertWeightSlice` whose `weight` is its rows of the stack (expert_stacks.py), taken afresh on every read (eager
code, PEFT wrappers and merges go through the stack). `state_dict()`/`load_state_dict()` keep the per-expert keys (hooks
split and join the stacks); sharded stacks (DTensor) are saved as they are, under the stack's key, so that distributed
checkpoints stay sharded (load them into a model installed with `stack_experts=True`). `uninstall` gives each expert a
parameter again (a view of its rows). Create the optimizer after install: `model.parameters()` yields the stacks.
"""

from __future__ import annotations

import torch
from torch import nn

from graph_moe.expert_stacks import ExpertStacks, StackSlice

OWNER = "graph_moe_experts"


class ExpertWeightSlice(StackSlice):
    """An expert's gate, up or down Linear whose weight is its rows of `gate_up` or `down`, parameters of the block's
    `graph_moe_experts`."""


# Sharded stacks are saved as they are (distributed checkpoints stay sharded); unstacked, each expert's weight is a
# view of its rows (no copy); state_dict() lists the experts' keys in module order, as the untouched model does.
_STACKS = ExpertStacks(OWNER, ExpertWeightSlice, keep_sharded=True, copy_on_unstack=False, keys_by_stack=False)


def is_stacked(block: nn.Module) -> bool:
    return OWNER in block._modules


def stack_experts(block: nn.Module, linears, gate_up: torch.Tensor, down: torch.Tensor) -> nn.Module:
    """Register `gate_up`/`down` (the layout's stacks) as parameters of `block.graph_moe_experts` and turn each
    expert's (gate, up, down) Linear in `linears` into a slice of them. Returns the owner module."""
    requires_grad = linears[0][0].weight.requires_grad
    owner = nn.Module()
    owner.gate_up = nn.Parameter(gate_up, requires_grad=requires_grad)
    owner.down = nn.Parameter(down, requires_grad=requires_grad)
    _STACKS.attach(block, owner)
    inter = linears[0][0].out_features
    for e, (gate, up, down_linear) in enumerate(linears):
        for linear, stack, rows in ((gate, "gate_up", slice(0, inter)), (up, "gate_up", slice(inter, 2 * inter)),
                                    (down_linear, "down", slice(0, down.shape[1]))):
            _STACKS.make_slice(linear, owner, stack, (e, rows))
    return owner


def unstack_experts(block: nn.Module) -> None:
    """Give every expert Linear a parameter of its own again (a view of its rows: no copy) and drop the stacks."""
    if is_stacked(block):
        _STACKS.unstack(block)


def split_stacked_experts(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`{name: tensor}` from `model.named_parameters()` (or their gradients) with each expert stack replaced by its
    experts' rows under their per-expert names: what the same model without stacked experts would list."""
    blocks = {name: module for name, module in model.named_modules() if is_stacked(module)}

    def rows_of_stack(block_name: str, stack: str, value: torch.Tensor):
        if block_name not in blocks:
            return None
        return {f"{block_name}.{key}": module.rows_of(value)
                for key, stack_key, module in _STACKS.entries(blocks[block_name]) if stack_key == stack}

    return _STACKS.split_names(tensors, rows_of_stack)

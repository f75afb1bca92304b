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

Stacked, `block.graph_moe_experts` owns `gate_up` and `down` (nn.Parameter); each expert's gate/up/down Linear
becomes an `ExpertWeightSlice` whose `weight` is its rows of the stack, taken afresh on every read (eager code, PEFT
wrappers and merges go through the stack). `state_dict()`/`load_state_dict()` keep the per-expert keys (hooks split
and join the stacks); sharded stacks (DTensor) are saved as they are, under the stack's key, so that distributed
checkpoints stay sharded (load them into a model installed with `stack_experts=True`). `uninstall` gives each expert
a parameter again (a view of its rows). Create the optimizer after install: `model.parameters()` yields the stacks.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

OWNER = "graph_moe_experts"
_HOOKS = "_graph_moe_expert_hooks"
_FIELDS = ("_graph_moe_owner", "_graph_moe_stack", "_graph_moe_index", "_graph_moe_rows")


class ExpertWeightSlice(nn.Linear):
    """An expert's gate, up or down Linear whose weight is rows `_graph_moe_rows` of expert `_graph_moe_index` in a
    stacked parameter of `_graph_moe_owner`."""

    @property
    def weight(self) -> torch.Tensor:
        return self.rows_of(getattr(self._graph_moe_owner, self._graph_moe_stack))

    def rows_of(self, stack: torch.Tensor) -> torch.Tensor:
        """This Linear's weight within `stack` (its stack's parameter, value in a state dict, or gradient)."""
        start, stop = self._graph_moe_rows
        return stack[self._graph_moe_index, start:stop]

    def parameters(self, recurse: bool = True):
        """The stack these rows belong to (what `requires_grad_` and device/dtype lookups on the Linear reach)."""
        yield getattr(self._graph_moe_owner, self._graph_moe_stack)


def is_stacked(block: nn.Module) -> bool:
    return OWNER in block._modules


def stack_experts(block: nn.Module, linears, gate_up: torch.Tensor, down: torch.Tensor) -> nn.Module:
    """Register `gate_up`/`down` (the layout's stacks) as parameters of `block.graph_moe_experts` and turn each
    expert's (gate, up, down) Linear in `linears` into a slice of them. Returns the owner module."""
    requires_grad = linears[0][0].weight.requires_grad
    owner = nn.Module()
    owner.gate_up = nn.Parameter(gate_up, requires_grad=requires_grad)
    owner.down = nn.Parameter(down, requires_grad=requires_grad)
    block.add_module(OWNER, owner)
    block.__dict__[_HOOKS] = (block._register_state_dict_hook(_split_stacks),
                              block._register_load_state_dict_pre_hook(_join_stacks, with_module=True))
    inter = linears[0][0].out_features
    for e, (gate, up, down_linear) in enumerate(linears):
        for linear, stack, rows in ((gate, "gate_up", (0, inter)), (up, "gate_up", (inter, 2 * inter)),
                                    (down_linear, "down", (0, down.shape[1]))):
            del linear._parameters["weight"]
            linear.__class__ = ExpertWeightSlice
            linear.__dict__.update(zip(_FIELDS, (owner, stack, e, rows)))
    return owner


def _slices(block: nn.Module):
    """(state_dict name relative to the block, slice) of every expert Linear still reading the block's stacks."""
    owner = block._modules.get(OWNER)
    for name, module in block.experts.named_modules(prefix="experts"):
        if type(module) is ExpertWeightSlice and module._graph_moe_owner is owner:
            yield name, module


def unstack_experts(block: nn.Module) -> None:
    """Give every expert Linear a parameter of its own again (a view of its rows: no copy) and drop the stacks."""
    if not is_stacked(block):
        return
    for _, module in list(_slices(block)):
        weight = module.weight.detach()
        requires_grad = getattr(module._graph_moe_owner, module._graph_moe_stack).requires_grad
        for field in _FIELDS:
            del module.__dict__[field]
        module.__class__ = nn.Linear
        module.weight = nn.Parameter(weight, requires_grad=requires_grad)
    block._modules.pop(OWNER, None)
    for handle in block.__dict__.pop(_HOOKS, ()):
        handle.remove()


def _split_stacks(block, state_dict, prefix, local_metadata):
    """state_dict hook: each expert's `...weight` key in place of the stacks (sharded stacks stay stacked)."""
    keys = [f"{prefix}{OWNER}.{stack}" for stack in ("gate_up", "down")]
    if any(isinstance(state_dict.get(key), DTensor) for key in keys):
        return state_dict
    stacks = {key.rsplit(".", 1)[1]: state_dict.pop(key) for key in keys if key in state_dict}
    if stacks:
        for name, module in _slices(block):
            state_dict[f"{prefix}{name}.weight"] = module.rows_of(stacks[module._graph_moe_stack])
    return state_dict


def _join_stacks(block, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: per-expert keys (checkpoints of the untouched model, `state_dict()` above) stacked
    into the stacks' keys."""
    owner = block._modules.get(OWNER)
    slices = list(_slices(block))
    if owner is None or not slices or not all(f"{prefix}{name}.weight" in state_dict for name, _ in slices):
        return
    if isinstance(owner.gate_up, DTensor):
        return  # sharded stacks load sharded checkpoints (the stacks' keys); load_state_dict reports the rest
    stacks = {stack: torch.empty(getattr(owner, stack).shape, dtype=getattr(owner, stack).dtype)
              for stack in ("gate_up", "down")}
    for name, module in slices:
        module.rows_of(stacks[module._graph_moe_stack]).copy_(state_dict.pop(f"{prefix}{name}.weight"))
    for stack, value in stacks.items():
        state_dict[f"{prefix}{OWNER}.{stack}"] = value


def split_stacked_experts(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`{name: tensor}` from `model.named_parameters()` (or their gradients) with each expert stack replaced by its
    experts' rows under their per-expert names: what the same model without stacked experts would list."""
    blocks = {name: module for name, module in model.named_modules() if is_stacked(module)}
    out = {}
    for name, value in tensors.items():
        block_name, sep, stack = name.rpartition(f".{OWNER}.")
        if not sep or block_name not in blocks:
            out[name] = value
            continue
        for slice_name, module in _slices(blocks[block_name]):
            if module._graph_moe_stack == stack:
                out[f"{block_name}.{slice_name}.weight"] = module.rows_of(value)
    return out

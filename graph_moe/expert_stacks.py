"""Per-expert parameters held as stacks, each expert's parameter a slice of its stack.

Glossary (one meaning a word, in graph_moe):
- stack: one (E, ...) tensor holding a per-expert parameter for every expert (expert weights `gate_up`, `down`; one
  projection's LoRA `lora_A` or `lora_B` of one adapter; a 4-bit weight's packed data, `layout.Stacked4bit`).
- slice: an expert's Linear whose `weight` is its rows of a stack, read afresh on every access (`StackSlice`).
- stacked (experts, adapters): whose stacks are parameters of an owner module under the MoE block, the experts'
  Linears slices of them. The pass's torch.stack of per-expert weights in the graph is "stacking per forward".
- layout: a block's expert weights laid out once as stacks for the grouped GEMMs (layout.py, `ExpertLayout`), plain
  tensors the expert weights are views of or, stacked, the owner's parameters; never a tensor's strides.

`ExpertStacks` is the mechanism both stacked experts (stacked_experts.py) and stacked LoRA adapters
(stacked_adapters.py) use: turning Linears into slices and back, and state-dict hooks that keep each expert's own key
(transformers' or PEFT's) in `state_dict()` and `load_state_dict()`, so checkpoints stay as without stacks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

_FIELDS = ("_graph_moe_holder", "_graph_moe_stack", "_graph_moe_index")


class StackSlice(nn.Linear):
    """An expert's Linear whose weight is `stack[_graph_moe_index]`, the stack being parameter `_graph_moe_stack` of
    module `_graph_moe_holder` (the index: the expert, or the expert and a range of rows)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.rows_of(getattr(self._graph_moe_holder, self._graph_moe_stack))

    def rows_of(self, stack: torch.Tensor) -> torch.Tensor:
        """This Linear's weight within `stack` (its stack's parameter, value in a state dict, or gradient)."""
        return stack[self._graph_moe_index]

    def parameters(self, recurse: bool = True):
        """The stack these rows belong to: what `requires_grad_`, PEFT's set_adapter and device/dtype lookups on the
        Linear reach. (Model-wide listings walk `_parameters` and see the stack once, on its holder.)"""
        yield getattr(self._graph_moe_holder, self._graph_moe_stack)


@dataclasses.dataclass(frozen=True)
class ExpertStacks:
    """One kind of stacks a MoE block may own, under `block.<owner_name>`, read by slices of type `slice_class`."""
    owner_name: str
    slice_class: type[StackSlice]
    keep_sharded: bool  # sharded stacks (DTensor) are saved and loaded as they are, under the stack's own key
    copy_on_unstack: bool  # unstacked, each Linear gets a copy of its rows (else a view of them)
    keys_by_stack: bool  # state_dict() lists the per-expert keys stack by stack (else in module order)

    def owner(self, block: nn.Module) -> nn.Module | None:
        return block._modules.get(self.owner_name)

    def attach(self, block: nn.Module, owner: nn.Module) -> None:
        """Register `owner` (the module whose parameters are the stacks) on `block`, with the state-dict hooks."""
        block.add_module(self.owner_name, owner)
        block.__dict__[self._hooks] = (block._register_state_dict_hook(self._split),
                                       block._register_load_state_dict_pre_hook(self._join, with_module=True))

    def make_slice(self, linear: nn.Linear, holder: nn.Module, stack: str, index) -> None:
        """Turn `linear` into a slice reading `getattr(holder, stack)[index]` (its own weight parameter dropped)."""
        del linear._parameters["weight"]
        linear.__class__ = self.slice_class
        linear.__dict__.update(zip(_FIELDS, (holder, stack, index)))

    def slices(self, block: nn.Module) -> list[tuple[str, StackSlice]]:
        """(name relative to the block, slice) of every expert Linear still reading the block's stacks."""
        owner = self.owner(block)
        if owner is None:
            return []
        holders = {id(module) for module in owner.modules()}
        return [(name, module) for name, module in block.experts.named_modules(prefix="experts")
                if type(module) is self.slice_class and id(module._graph_moe_holder) in holders]

    def unstack(self, block: nn.Module) -> None:
        """Give every slice a weight parameter of its own again and drop the stacks and hooks."""
        for _, module in self.slices(block):
            weight = module.weight.detach()
            requires_grad = getattr(module._graph_moe_holder, module._graph_moe_stack).requires_grad
            for field in _FIELDS:
                del module.__dict__[field]
            module.__class__ = nn.Linear
            weight = weight.clone() if self.copy_on_unstack else weight
            module.weight = nn.Parameter(weight, requires_grad=requires_grad)
        block._modules.pop(self.owner_name, None)
        # (A deep copy's hook handles may point at the original's hooks: the hooks do nothing without the owner.)
        for handle in block.__dict__.pop(self._hooks, ()):
            handle.remove()

    def entries(self, block: nn.Module) -> list[tuple[str, str, StackSlice]]:
        """(per-expert state_dict key, stack key, slice), keys relative to the block, in the order state_dict() lists
        the per-expert keys."""
        owner = self.owner(block)
        holder_names = {id(module): name for name, module in owner.named_modules(prefix=self.owner_name)}
        found = [(f"{name}.weight", f"{holder_names[id(module._graph_moe_holder)]}.{module._graph_moe_stack}", module)
                 for name, module in self.slices(block)]
        if self.keys_by_stack:
            order = {name: i for i, (name, _) in enumerate(owner.named_parameters(prefix=self.owner_name))}
            found.sort(key=lambda entry: order[entry[1]])
        return found

    def split_names(self, tensors: dict[str, torch.Tensor],
                    rows_of_stack: Callable[[str, str, torch.Tensor], dict[str, torch.Tensor] | None]):
        """`tensors` with each stack `<block>.<owner_name>.<...>` replaced by `rows_of_stack(block, stack key relative
        to the block, value)` (per-expert name -> rows), unless that gives None."""
        out = {}
        for name, value in tensors.items():
            block, sep, stack = name.rpartition(f".{self.owner_name}.")
            rows = rows_of_stack(block, f"{self.owner_name}.{stack}", value) if sep else None
            if rows is None:
                out[name] = value
            else:
                out.update(rows)
        return out

    @property
    def _hooks(self) -> str:
        return f"_{self.owner_name}_hooks"

    def _split(self, block, state_dict, prefix, local_metadata):
        """state_dict hook: each slice's per-expert key in place of the stacks."""
        owner = self.owner(block)
        if owner is None:
            return state_dict
        stacks = {}
        for stack, _ in owner.named_parameters(prefix=self.owner_name):
            value = state_dict.get(prefix + stack)
            if value is None or (self.keep_sharded and isinstance(value, DTensor)):
                continue
            # detached: rows of a parameter (state_dict(keep_vars=True)) would be autograd views, which deepcopy refuses
            stacks[stack] = (value.full_tensor() if isinstance(value, DTensor) else value).detach()
            del state_dict[prefix + stack]
        for key, stack, module in self.entries(block):
            if stack in stacks:
                state_dict[prefix + key] = module.rows_of(stacks[stack])
        return state_dict

    def _join(self, block, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """load_state_dict pre-hook: the per-expert keys (a checkpoint without stacks, `state_dict()` above) of each
        stack whose keys are all there, joined into the stack's key."""
        owner = self.owner(block)
        if owner is None:
            return
        by_stack: dict[str, list[tuple[str, StackSlice]]] = {}
        for key, stack, module in self.entries(block):
            by_stack.setdefault(stack, []).append((prefix + key, module))
        for stack, slices in by_stack.items():
            param = owner.get_parameter(stack.partition(".")[2])
            if self.keep_sharded and isinstance(param, DTensor):
                continue  # sharded stacks load sharded checkpoints (the stack's key); load_state_dict reports the rest
            if not all(key in state_dict for key, _ in slices):
                continue
            mismatched = [(key, state_dict[key].shape, module.rows_of(param).shape) for key, module in slices
                          if state_dict[key].shape != module.rows_of(param).shape]
            if mismatched:  # reported as for the per-expert parameters (copy_ would broadcast some shapes)
                error_msgs.extend(f"size mismatch for {key}: copying a param with shape {got} from checkpoint, the "
                                  f"shape in current model is {want}." for key, got, want in mismatched)
                continue
            first = state_dict[slices[0][0]]
            value = torch.empty(param.shape, dtype=first.dtype, device=first.device)
            for key, module in slices:
                module.rows_of(value).copy_(state_dict.pop(key))
            state_dict[prefix + stack] = value

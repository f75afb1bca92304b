"""PEFT LoRA adapters of every expert stacked into one parameter per projection and adapter.

PEFT gives each expert of a 4.x ModuleList block its own lora_A / lora_B Linear: 2 x 3 x E parameters per MoE
layer (768 for Qwen3-30B-A3B). The grouped graph reads them all: each step that is 768 graph inputs to check,
768 weights stacked into the grouped GEMMs' operands, 768 gradients split back out and 768 AccumulateGrad nodes in
the autograd engine; host work that, at 4096 tokens, takes several times longer than the GPU's.

Stacked, each (projection, adapter) pair owns two parameters, `lora_A` (E, r, in) and `lora_B` (E, out, r), in
`block.graph_moe_adapters.<projection>.<adapter>`; each expert's PEFT Linear stays in place, with a `weight` that is row
e of the stack (expert_stacks.py), taken afresh on every read (so eager PEFT code, merges and gradients go through the
stack). The grouped graph reads the stacks as they are: no copy, one gradient per stack.

What changes for the user: `model.parameters()` yields the stacks instead of the per-expert adapter weights, so
create the optimizer after `graph_moe.install`/`graph_moe.compile` (as after `get_peft_model`). `state_dict()` and
`load_state_dict()` keep PEFT's per-expert keys (hooks split and join the stacks), so `save_pretrained` and
`PeftModel.from_pretrained` files are unchanged. `uninstall` gives each expert its own parameters back.
"""

from __future__ import annotations

import torch
from torch import nn

from graph_moe.expert_stacks import DTensor, ExpertStacks, StackSlice
from graph_moe.families.common import gated_experts

OWNER = "graph_moe_adapters"
ROLES = ("lora_A", "lora_B")


class ExpertAdapterSlice(StackSlice):
    """An expert's PEFT lora_A / lora_B Linear whose weight is its row of a stack, a parameter of
    `graph_moe_adapters.<projection>.<adapter>`."""


# Sharded stacks are gathered into PEFT's per-expert keys (save_pretrained files); unstacked, each expert gets a copy
# of its row; state_dict() lists the keys stack by stack.
_STACKS = ExpertStacks(OWNER, ExpertAdapterSlice, keep_sharded=False, copy_on_unstack=True, keys_by_stack=True)


def _candidates(block: nn.Module, projection: str) -> dict[str, list[tuple[nn.Linear, nn.Linear]]]:
    """adapter name -> every expert's (lora_A, lora_B) Linear, for the adapters that can be stacked: on every
    expert, plain bias-free Linears of one shape, dtype, device and requires_grad each, not sharded."""
    wrappers = [getattr(expert, projection, None) for expert in gated_experts(block)]
    if not all(isinstance(getattr(w, "lora_A", None), nn.ModuleDict) for w in wrappers):
        return {}
    found = {}
    for adapter in wrappers[0].lora_A.keys():
        pairs = []
        for w in wrappers:
            if adapter not in w.lora_A or adapter not in w.lora_B:
                break
            pairs.append((w.lora_A[adapter], w.lora_B[adapter]))
        if len(pairs) == len(wrappers) and all(_stackable(m, ref) for p in pairs for m, ref in zip(p, pairs[0])):
            found[adapter] = pairs
    return found


def _stackable(module: nn.Module, ref: nn.Module) -> bool:
    if type(module) is not nn.Linear or module.bias is not None or module._forward_hooks or module._forward_pre_hooks:
        return False
    w, r = module.weight, ref.weight
    return (not isinstance(w, DTensor) and w.shape == r.shape and w.dtype == r.dtype and w.device == r.device
            and w.requires_grad == r.requires_grad)


def stack_adapters(block: nn.Module, projections: tuple[str, ...]) -> int:
    """Stack the LoRA adapters of `block`'s experts (see the module docstring); returns how many (projection,
    adapter) pairs this call stacked."""
    prune_dead_stacks(block)
    owner = _STACKS.owner(block)
    newly = 0
    for projection in projections:
        for adapter, pairs in _candidates(block, projection).items():
            if owner is None:
                owner = nn.ModuleDict()
                _STACKS.attach(block, owner)
            if projection not in owner:
                owner[projection] = nn.ModuleDict()
            holder = nn.Module()  # the pair's two stacks
            for i, role in enumerate(ROLES):
                weights = [p[i].weight for p in pairs]
                holder.register_parameter(role, nn.Parameter(torch.stack([w.detach() for w in weights]),
                                                              requires_grad=weights[0].requires_grad))
            owner[projection][adapter] = holder
            newly += 1
            for e, pair in enumerate(pairs):
                for role, linear in zip(ROLES, pair):
                    _STACKS.make_slice(linear, holder, role, e)
    return newly


def stacked_pairs(block: nn.Module) -> int:
    """How many (projection, adapter) pairs of `block` are stacked."""
    return sum(len(adapters) for adapters in block._modules.get(OWNER, {}).values())


def unstack_adapters(block: nn.Module) -> None:
    """Give every expert's adapter Linear its own parameter again (a copy of its row) and drop the stacks."""
    _STACKS.unstack(block)


def _live(block: nn.Module, projection: str, adapter: str) -> bool:
    """The stacks still feed expert 0's PEFT Linear (PEFT's merge_and_unload/delete_adapter drop the wrappers or
    adapters, leaving the stacks behind)."""
    wrapper = block.experts[0]._modules.get(projection)
    lora_a = getattr(wrapper, "lora_A", None)
    slice_ = lora_a._modules.get(adapter) if isinstance(lora_a, nn.ModuleDict) else None
    return type(slice_) is ExpertAdapterSlice and slice_._graph_moe_holder is block._modules[OWNER][projection][adapter]


def prune_dead_stacks(block: nn.Module) -> None:
    """Drop the stacks no expert reads any more."""
    owner = block._modules.get(OWNER)
    for projection, adapters in list(owner.items()) if owner is not None else ():
        for adapter in [a for a in adapters if not _live(block, projection, a)]:
            del adapters[adapter]


def split_stacked(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{name: tensor}` from `named_parameters()` (or their gradients) with each stack replaced by its rows under
    PEFT's per-expert names: what the same model without stacked adapters would list."""
    def rows_of_stack(block: str, stack: str, value: torch.Tensor):
        _, projection, adapter, role = stack.split(".")
        return {f"{block}.experts.{e}.{projection}.{role}.{adapter}.weight": row
                for e, row in enumerate(value.unbind())}

    return _STACKS.split_names(tensors, rows_of_stack)

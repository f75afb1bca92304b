"""PEFT LoRA adapters of every expert stacked into one parameter per projection and adapter.

PEFT gives each expert of a 4.x ModuleList block its own lora_A / lora_B Linear: 2 x 3 x E parameters per MoE
layer (768 for Qwen3-30B-A3B). The grouped graph reads them all: each step that is 768 graph inputs to check,
768 weights stacked into the grouped GEMMs' operands, 768 gradients split back out and 768 AccumulateGrad nodes in
the autograd engine; host work that, at 4096 tokens, takes several times longer than the GPU's.

Stacked, each (projection, adapter) pair owns two parameters, `lora_A` (E, r, in) and `lora_B` (E, out, r), in
`block.graph_moe_adapters.<projection>.<adapter>`; each expert's PEFT Linear stays in place, with a `weight` that is
row e of the stack, taken afresh on every read (so eager PEFT code, merges and gradients go through the stack).
The grouped graph reads the stacks as they are: no copy, one gradient per stack.

What changes for the user: `model.parameters()` yields the stacks instead of the per-expert adapter weights, so
create the optimizer after `graph_moe.install`/`graph_moe.compile` (as after `get_peft_model`). `state_dict()` and
`load_state_dict()` keep PEFT's per-expert keys (hooks split and join the stacks), so `save_pretrained` and
`PeftModel.from_pretrained` files are unchanged. `uninstall` gives each expert its own parameters back.
"""

from __future__ import annotations

import torch
from torch import nn

from graph_moe.families.common import gated_experts

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()

_HOOKS = "_graph_moe_adapter_hooks"
OWNER = "graph_moe_adapters"
ROLES = ("lora_A", "lora_B")


class ExpertAdapterSlice(nn.Linear):
    """An expert's PEFT lora_A / lora_B Linear whose weight is row `index` of a stacked parameter."""

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._graph_moe_stack, self._graph_moe_role)[self._graph_moe_index]

    def parameters(self, recurse: bool = True):
        """The stack this row belongs to: what PEFT's set_adapter (requires_grad on/off) and device/dtype lookups
        reach through `lora_A[name].parameters()`. (Model-wide listings walk `_parameters` and see the stack once, on
        the block.)"""
        yield getattr(self._graph_moe_stack, self._graph_moe_role)


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
    owner = block._modules.get(OWNER)
    newly = 0
    for projection in projections:
        for adapter, pairs in _candidates(block, projection).items():
            if owner is None:
                owner = nn.ModuleDict()
                block.add_module(OWNER, owner)
                block.__dict__[_HOOKS] = (block._register_state_dict_hook(_split_stacks),
                                          block._register_load_state_dict_pre_hook(_join_stacks, with_module=True))
            if projection not in owner:
                owner[projection] = nn.ModuleDict()
            stack = nn.Module()
            for i, role in enumerate(ROLES):
                weights = [p[i].weight for p in pairs]
                stack.register_parameter(role, nn.Parameter(torch.stack([w.detach() for w in weights]),
                                                             requires_grad=weights[0].requires_grad))
            owner[projection][adapter] = stack
            newly += 1
            for e, pair in enumerate(pairs):
                for role, linear in zip(ROLES, pair):
                    del linear._parameters["weight"]
                    linear.__class__ = ExpertAdapterSlice
                    linear.__dict__.update(_graph_moe_stack=stack, _graph_moe_role=role, _graph_moe_index=e)
    return newly


def stacked_pairs(block: nn.Module) -> int:
    """How many (projection, adapter) pairs of `block` are stacked."""
    return sum(len(adapters) for adapters in block._modules.get(OWNER, {}).values())


def unstack_adapters(block: nn.Module) -> None:
    """Give every expert's adapter Linear its own parameter again (a copy of its row) and drop the stacks."""
    owner = block._modules.pop(OWNER, None)
    for handle in block.__dict__.pop(_HOOKS, ()):
        handle.remove()
    if owner is None:
        return
    for module in block.experts.modules():
        if type(module) is ExpertAdapterSlice:
            weight = module.weight.detach().clone()
            requires_grad = getattr(module._graph_moe_stack, module._graph_moe_role).requires_grad
            for name in ("_graph_moe_stack", "_graph_moe_role", "_graph_moe_index"):
                del module.__dict__[name]
            module.__class__ = nn.Linear
            module.weight = nn.Parameter(weight, requires_grad=requires_grad)


def _live(block: nn.Module, projection: str, adapter: str) -> bool:
    """The stack still feeds expert 0's PEFT Linear (PEFT's merge_and_unload/delete_adapter drop the wrappers or
    adapters, leaving the stack behind)."""
    wrapper = block.experts[0]._modules.get(projection)
    lora_a = getattr(wrapper, "lora_A", None)
    slice_ = lora_a._modules.get(adapter) if isinstance(lora_a, nn.ModuleDict) else None
    return type(slice_) is ExpertAdapterSlice and slice_._graph_moe_stack is block._modules[OWNER][projection][adapter]


def prune_dead_stacks(block: nn.Module) -> None:
    """Drop the stacks no expert reads any more."""
    owner = block._modules.get(OWNER)
    for projection, adapters in list(owner.items()) if owner is not None else ():
        for adapter in [a for a in adapters if not _live(block, projection, a)]:
            del adapters[adapter]


def _per_expert_key(prefix: str, projection: str, adapter: str, role: str, e: int) -> str:
    return f"{prefix}experts.{e}.{projection}.{role}.{adapter}.weight"


def _split_stacks(block, state_dict, prefix, local_metadata):
    """state_dict hook: PEFT's per-expert keys in place of the stacks."""
    # (A deep copy's hook handles point at the original's hooks: after uninstall of a copy its hooks may remain.)
    for projection, adapters in block._modules.get(OWNER, {}).items():
        for adapter in adapters:
            for role in ROLES:
                value = state_dict.pop(f"{prefix}{OWNER}.{projection}.{adapter}.{role}", None)
                if value is None or not _live(block, projection, adapter):
                    continue
                value = value.full_tensor() if isinstance(value, DTensor) else value
                for e, row in enumerate(value.detach().unbind()):
                    state_dict[_per_expert_key(prefix, projection, adapter, role, e)] = row
    return state_dict


def _join_stacks(block, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: per-expert keys (PEFT files, `state_dict()` above) stacked into the stack's key."""
    num_experts = len(gated_experts(block))
    for projection, adapters in block._modules.get(OWNER, {}).items():
        for adapter in adapters:
            for role in ROLES:
                keys = [_per_expert_key(prefix, projection, adapter, role, e) for e in range(num_experts)]
                if all(k in state_dict for k in keys):
                    state_dict[f"{prefix}{OWNER}.{projection}.{adapter}.{role}"] = torch.stack(
                        [state_dict.pop(k) for k in keys])


def split_stacked(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{name: tensor}` from `named_parameters()` (or their gradients) with each stack replaced by its rows under
    PEFT's per-expert names: what the same model without stacked adapters would list."""
    out = {}
    for name, value in tensors.items():
        block, sep, rest = name.partition(f".{OWNER}.")
        if not sep:
            out[name] = value
            continue
        projection, adapter, role = rest.split(".")
        for e, row in enumerate(value.unbind()):
            out[_per_expert_key(f"{block}.", projection, adapter, role, e)] = row
    return out

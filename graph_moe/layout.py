"""Frozen expert weights laid out once for grouped GEMMs, with each expert's weight a view into them.

Without a layout, the grouped graph stacks E expert weights into one (E, out, in) tensor on every
forward: a full copy of the expert weights per step (on an H200, 3 ms of a 7 ms Qwen3-30B-A3B layer),
and for training a saved copy per layer. With a layout, `gate_up` (E, 2I, H: each expert's gate rows
then its up rows) and `down` (E, H, I) exist once; every expert's nn.Linear weight becomes a view into
them, so `state_dict()`, in-place updates, `load_state_dict` and PEFT merges read and write the same
memory. The traceable forward then computes expert e from `gate_up[e]` and `down[e]`, and the pass
hands `gate_up` and `down` to torch._grouped_mm as they are.

The layout is used only while it is provably current. `usable_layout` is traced by Dynamo, which
guards each fact it reads: the projection modules are the ones laid out, or PEFT LoRA wrappers around
them in plain use (unmerged, vanilla LoRA: the adapters are added as PEFT adds them), their weights do
not require grad, and the layout was not invalidated (a parameter re-registered on a laid-out Linear,
e.g. `load_state_dict(assign=True)`). `.to()`/`.cuda()`/`.half()` rebuild the views. Assigning a new
tensor to `weight.data` by hand bypasses all of this: call `graph_moe.install(model)` again after it.
When any check fails the forward falls back to calling the expert modules, which the pass groups by
stacking: slower, never stale.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ATTR = "_graph_moe_layout"


@dataclasses.dataclass(eq=False)
class ExpertLayout:
    gate_up: torch.Tensor  # (E, 2I, H)
    down: torch.Tensor  # (E, H, I)
    linears: list[tuple[nn.Linear, nn.Linear, nn.Linear]]  # (gate, up, down) of each expert, as laid out
    names: tuple[str, str, str]
    act_fn: Callable
    valid: bool = True

    def expert(self, e: int, x: torch.Tensor, expert: nn.Module) -> torch.Tensor:
        """Expert e's MLP, down(act(gate(x)) * up(x)): gate and up in one matmul on the layout, plus the
        LoRA adapters of PEFT-wrapped projections."""
        gate_mod, up_mod, down_mod = (getattr(expert, n) for n in self.names)
        gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        hidden = self.act_fn(_plus_lora(gate_mod, x, gate)) * _plus_lora(up_mod, x, up)
        return _plus_lora(down_mod, hidden, F.linear(hidden, self.down[e]))


def _plus_lora(module: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """What PEFT's lora.Linear.forward adds after its base layer (vanilla LoRA, unmerged)."""
    if not hasattr(module, "lora_A"):
        return result
    dtype = result.dtype
    for name in module.active_adapters:
        if name not in module.lora_A.keys():
            continue
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        x = module._cast_input_dtype(x, lora_a.weight.dtype)
        result = result + lora_b(lora_a(module.lora_dropout[name](x))) * module.scaling[name]
    return result.to(dtype)


def _base(module: nn.Module) -> nn.Module:
    """The Linear under a PEFT LoRA wrapper, or the module itself."""
    return module.base_layer if hasattr(module, "lora_A") and hasattr(module, "base_layer") else module


def _plain_lora(module: nn.Module, lin: nn.Module) -> bool:
    """A PEFT lora.Linear around `lin` whose forward is base + vanilla LoRA (what `_plus_lora` computes)."""
    return (getattr(module, "base_layer", None) is lin and hasattr(module, "lora_A") and not module.disable_adapters
            and not module.merged and not module.lora_variant and not module.fan_in_fan_out)


# Laid-out Linear -> its layout, to invalidate the layout when a parameter is re-registered on it.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_parameter_registered(module, name, param):
    layout = _OWNERS.get(module)
    if layout is not None and name == "weight":
        layout.valid = False


torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)


def _why_not(block: nn.Module, names) -> str | None:
    experts = list(block.experts)
    dtypes = set()
    for e, expert in enumerate(experts):
        if type(expert) is not type(experts[0]) or not callable(getattr(expert, "act_fn", None)):
            return f"expert {e} is not a gated MLP like expert 0"
        if expert._forward_hooks or expert._forward_pre_hooks:
            return f"expert {e} has hooks"
        for name in names:
            module = getattr(expert, name, None)
            lin = _base(module)
            if module is not lin and not _plain_lora(module, lin):
                return f"experts[{e}].{name} is a LoRA layer in a state graph_moe does not lay out (merged, DoRA, ...)"
            if type(lin) is not nn.Linear:
                return f"experts[{e}].{name} is a {type(lin).__name__}, not a plain nn.Linear"
            if lin.weight.requires_grad:
                return "trainable experts (stacked per forward, so gradients reach every expert weight)"
            if lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks:
                return f"experts[{e}].{name} has a bias or hooks"
            dtypes.add((lin.weight.dtype, lin.weight.device))
    if len(dtypes) > 1:
        return "expert weights of mixed dtypes or devices"
    return None


def _build(block: nn.Module, names) -> ExpertLayout:
    linears = [tuple(_base(getattr(x, n)) for n in names) for x in block.experts]
    gate_up = torch.stack([torch.cat([g.weight, u.weight]) for g, u, _ in linears]).detach()
    down = torch.stack([d.weight for _, _, d in linears]).detach()
    inter = linears[0][0].out_features
    with torch.no_grad():
        for e, (g, u, d) in enumerate(linears):
            g.weight.data = gate_up[e, :inter]
            u.weight.data = gate_up[e, inter:]
            d.weight.data = down[e]
    layout = ExpertLayout(gate_up, down, linears, tuple(names), block.experts[0].act_fn)
    for lins in linears:
        for lin in lins:
            _OWNERS[lin] = layout
    return layout


def _apply_then_relayout(self, fn, recurse=True):
    """nn.Module._apply gives every parameter new storage (.to/.cuda/.half); lay the experts out again."""
    type(self)._apply(self, fn, recurse)
    layout = self.__dict__.get(_ATTR)
    if layout is not None:
        self.__dict__[_ATTR] = _build(self, layout.names)
    return self


def lay_out(block: nn.Module, names: tuple[str, str, str]) -> str | None:
    """Lay out the frozen gated experts of `block`; returns why not, or None when done."""
    reason = _why_not(block, names)
    if reason is None:
        block.__dict__[_ATTR] = _build(block, names)
        block._apply = types.MethodType(_apply_then_relayout, block)
    return reason


def remove_layout(block: nn.Module) -> None:
    """Forget the layout; the expert weights stay valid tensors (views keep the stacks alive)."""
    block.__dict__.pop(_ATTR, None)
    block.__dict__.pop("_apply", None)


def usable_layout(block: nn.Module) -> ExpertLayout | None:
    """The block's layout if it is current, else None. Traced by Dynamo: every fact read here is guarded."""
    layout = getattr(block, _ATTR, None)
    if layout is None or not layout.valid:
        return None
    for expert, lins in zip(block.experts, layout.linears):
        for name, lin in zip(layout.names, lins):
            module = getattr(expert, name)
            if lin.weight.requires_grad or (module is not lin and not _plain_lora(module, lin)):
                return None
    return layout

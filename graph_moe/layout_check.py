"""The grouped layout's per-expert facts, checked in plain Python before each call of a compiled model or region.

`usable_layout` and `ExpertLayout.uniform` read facts of all 3 x E expert projections: which module sits where,
whether a frozen weight was made trainable, PEFT's adapter state (active adapters, scaling, dropout, merged ...).
When Dynamo traces them, each read becomes a guard that runs on every call. On an H200's host (torch 2.11) that
cost 1.1 ms per call of a 128-expert decoder layer with frozen experts and 4.1 ms with PEFT LoRA: 50-200 ms a
training step for a 48-layer model, before any GPU work (benchmarks/diagnostics/guard_host_time.py;
benchmarks/records/h200_torch2.11_guard_host_time_regions.json).

`verify` gathers the same facts with C-level passes over lists made once (`map`, list compares against copies
made when the facts were last fully checked), then marks the layout `verified` for one call. The traced forward
reads that one flag instead of the 3 x E facts. It runs in `watch`'s hooks around each call of the model given to
graph_moe.install (`torch.compile(model)` runs them outside Dynamo), and around each call of a graph_moe.compile
region. When a fact changed, the full check (the same `usable_layout` and `uniform`, run in plain Python) runs once
and its verdict is kept for the new facts. Whether a frozen weight now
requires grad is read on every call: it changes no dict, so no comparison could see it.

This also keeps the layout correct whatever Dynamo's guards skip: by default torch 2.10 and 2.11 skip a tensor's
guards while the dicts holding it are unchanged, and a weight's `requires_grad_(True)` changes no dict
(`layout.keep_tensor_guards` turns those shortcuts off for the layouts Dynamo checks).
"""

from __future__ import annotations

import copy
import operator
from itertools import repeat

import torch
from torch import nn

from graph_moe.families.common import gated_experts
from graph_moe.layout import base_linear, layout_of, usable_layout
from graph_moe.stacked_adapters import OWNER as ADAPTERS

_MISSING = object()
# What `_plain_lora`, `_adapter_state` and `usable_layout` read from a PEFT LoRA layer's __dict__
# (`_modules`: base_layer, lora_A, lora_dropout ...; `scaling`: per adapter).
_LORA_FIELDS = ("_active_adapter", "_disable_adapters", "merged_adapters", "lora_variant", "fan_in_fan_out",
                "cast_input_dtype_enabled", "scaling", "_modules")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


class _Facts:
    """Where a block's per-expert facts are read from, what they were when last fully checked, and the verdict."""

    def __init__(self, block: nn.Module, layout):
        experts = gated_experts(block)
        self.experts_dict = block._modules["experts"]._modules
        names = [name for _ in experts for name in layout.names]
        self.module_dicts = [expert._modules for expert in experts for _ in layout.names]
        self.names = names
        projections = list(map(operator.getitem, self.module_dicts, names))
        wrappers = [m for m in projections if "lora_A" in m._modules]
        self.lora_dicts = [m.__dict__ for m in wrappers]
        # One C-level pass reads the fields every PEFT layer has; a field some lack is read with a default, and each
        # __dict__'s length catches a field added later
        everywhere = [key for key in _LORA_FIELDS if all(key in d for d in self.lora_dicts)]
        self.read_fields = operator.itemgetter(*everywhere) if everywhere else None
        self.sometimes = [key for key in _LORA_FIELDS if key not in everywhere]
        # PEFT's per-adapter ModuleDicts (which adapters exist, their modules) and the block's stacked adapters
        self.adapter_dicts = [m._modules[key]._modules for m in wrappers for key in ("lora_A", "lora_dropout")
                              if isinstance(m._modules.get(key), nn.ModuleDict)]
        stacked = block._modules.get(ADAPTERS)
        if stacked is not None:
            self.adapter_dicts += [stacked._modules, *(m._modules for m in stacked._modules.values())]
        dropouts = [d for m in wrappers if isinstance(m._modules.get("lora_dropout"), nn.ModuleDict)
                    for d in m._modules["lora_dropout"]._modules.values()]
        self.dropout_dicts = [d.__dict__ for d in dropouts]
        lins = list(map(base_linear, projections))
        # The frozen weights whose requires_grad is read on every call (a stacked or 4-bit layout has none to read)
        self.weight_dicts = [] if layout.four_bit else [lin._parameters for lin in lins
                                                        if lin._parameters.get("weight") is not None]
        self.values = _copy(self.read(block))
        with torch.no_grad():  # the structural facts; requires_grad is read per call
            self.usable = usable_layout(block) is layout
        # Checked whatever `no_adapters` says: with this verdict each traced body reads expert 0's PEFT state
        self.uniform = self.usable and layout.same_adapter_states(list(experts))

    def read(self, block: nn.Module) -> list:
        """The facts now, as lists (compared by value with the copies made when they were last checked)."""
        fields = [list(map(len, self.lora_dicts)), *(list(map(dict.get, self.lora_dicts, repeat(key), repeat(_MISSING)))
                                                     for key in self.sometimes)]
        if self.read_fields is not None:
            fields.append(list(map(self.read_fields, self.lora_dicts)))
        dropout = [list(map(dict.get, self.dropout_dicts, repeat(key), repeat(_MISSING))) for key in ("p", "training")]
        return [block._modules["experts"]._modules is self.experts_dict, list(self.experts_dict.values()),
                list(map(operator.getitem, self.module_dicts, self.names)), fields, self.adapter_dicts, dropout]

    def any_trainable_weight(self) -> bool:
        return any(map(_REQUIRES_GRAD, map(operator.getitem, self.weight_dicts, repeat("weight"))))


def _copy(read: list) -> list:
    """What `_Facts.read` returned, with every container it holds copied one level (a list or dict changed in place,
    such as PEFT's `scaling` or a ModuleDict's modules, then compares unequal); modules and other objects stay
    themselves (compared by identity)."""
    same_experts, experts, projections, fields, adapter_dicts, dropout = read
    return [same_experts, experts, projections,
            [[_copy_value(v) for v in values] for values in fields],
            [dict(d) for d in adapter_dicts], dropout]


def _copy_value(value):
    if isinstance(value, tuple):  # several fields of one layer
        return tuple(map(_copy_value, value))
    return copy.copy(value) if isinstance(value, (list, dict)) else value


def verify(block: nn.Module) -> bool:
    """Before one call of compiled code: mark the block's layout `verified` (and `verified_uniform`) when the facts
    `usable_layout` and `uniform` read say it is current, checked here in plain Python. Returns whether this call set
    the flags, and so must `clear` them after the call: False where there is nothing to check, or where an outer
    call (the model's hooks, around a region's call) verified the block already."""
    layout = layout_of(block)
    if layout is None or not layout.valid or layout.verified:
        return False
    facts = layout.checked
    try:
        if facts is None or facts.read(block) != facts.values:
            facts = layout.checked = _Facts(block, layout)
        with_grad = torch.is_grad_enabled()
        usable = facts.usable and not (with_grad and facts.any_trainable_weight())
    except (KeyError, AttributeError, TypeError, RuntimeError):  # something removed or replaced by hand: let Dynamo see
        layout.checked = None
        return False
    layout.verified, layout.verified_uniform, layout.verified_with_grad = usable, usable and facts.uniform, with_grad
    return True


def verify_blocks(blocks) -> list[nn.Module]:
    """`verify` each block; returns those it verified, which the caller clears (`clear_blocks`) after its call."""
    return [block for block in blocks if verify(block)]


def clear_blocks(blocks) -> None:
    for block in blocks:
        clear(block)


def clear(block: nn.Module) -> None:
    """After the call: the verdict holds for that call only (eager calls and other compiled code check again)."""
    layout = layout_of(block)
    if layout is not None:
        layout.verified = layout.verified_uniform = False


# The laid-out blocks under a watched model, and those its current call verified (and clears)
_BLOCKS, _VERIFIED = "_graph_moe_laid_out_blocks", "_graph_moe_verified_blocks"


def laid_out_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks under `module` (itself included) that have a grouped layout."""
    return [m for m in module.modules() if layout_of(m) is not None]


def watch(model: nn.Module) -> list[nn.Module]:
    """Verify the layouts of `model`'s blocks around each call of `model`, in forward hooks. `torch.compile(model)`
    (and `model.compile()`) runs a module's hooks outside Dynamo and compiles its forward, so Dynamo guards one flag
    per block instead of its 3 x E facts (torch.compile with graph_moe's backend; accelerate's dynamo plugin).
    Where the hooks are traced (a module around `model` compiled), they do nothing and Dynamo guards the facts.
    The blocks are found now (graph_moe.install calls this); a block laid out later is left to Dynamo's guards.
    Returns them (no hooks where there are none)."""
    blocks = model.__dict__[_BLOCKS] = laid_out_blocks(model)
    if blocks and _before not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_before)
        model.register_forward_hook(_after, always_call=True)
    return blocks


def unwatch(model: nn.Module) -> None:
    for hooks, hook in ((model._forward_pre_hooks, _before), (model._forward_hooks, _after)):
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]
    model.__dict__.pop(_BLOCKS, None)


def _before(model: nn.Module, args) -> None:
    if not torch.compiler.is_compiling():  # traced by Dynamo (an outer module compiled), it does nothing
        _verify_all(model)


def _after(model: nn.Module, args, output) -> None:
    if not torch.compiler.is_compiling():
        _clear_all(model)


# torch.compile(model) calls the hooks outside its trace, but as frames of their own, which Dynamo would compile
# (there `is_compiling()` is true): skip the hooks' own frames, and run what they call as plain Python.
for _hook in (_before, _after):
    torch._dynamo.eval_frame.skip_code(_hook.__code__)


@torch._dynamo.disable
def _verify_all(model: nn.Module) -> None:
    model.__dict__[_VERIFIED] = verify_blocks(model.__dict__.get(_BLOCKS, ()))


@torch._dynamo.disable
def _clear_all(model: nn.Module) -> None:
    clear_blocks(model.__dict__.pop(_VERIFIED, ()))

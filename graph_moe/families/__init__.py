"""Traceable forwards for transformers' MoE block classes, one module per group of families.

Each module defines `FAMILIES: {class name: Family}`; this package merges them. Classes are looked up by NAME,
so Unsloth's regenerated copies of these classes match too; transformers 5.x experts modules are found by structure
(`transformers5.is_5x_experts`), whatever their class. A class with experts in an nn.ModuleList and no family of its
name gets a forward derived from its own expert-hit loop where that loop allows it (transformers4_generic.py; Ernie
4.5 MoE this way). To add a family: write its traceable forward in a module here (see common.py for what
"traceable" means), list it in that module's FAMILIES, import it below.
"""

from __future__ import annotations

from torch import nn

from graph_moe.families import deepseek, empty_guard, mixtral_qwen, split_sizes, stacked, transformers4_generic, transformers5
from graph_moe.families.common import Family, module_list_check, range_expert_loop, softmax_topk

FAMILIES: dict[str, Family] = {}
for _module in (mixtral_qwen, empty_guard, deepseek, split_sizes, stacked, transformers5):
    FAMILIES.update(_module.FAMILIES)

TRACEABLE_FORWARDS = (frozenset(f.forward for f in FAMILIES.values())
                      | {transformers5.FAMILY.forward, transformers4_generic.FAMILY.forward})


def family_of(module: nn.Module) -> Family | None:
    """The family whose traceable forward `module` can take, or None."""
    if transformers5.looks_like_5x_experts(module):
        return transformers5.FAMILY
    family = FAMILIES.get(type(module).__name__)
    if family is None and _module_list(module) and transformers4_generic.derives(type(module)):
        return transformers4_generic.FAMILY
    return family


def _module_list(module: nn.Module) -> bool:
    return isinstance(getattr(module, "experts", None), nn.ModuleList)


def is_moe_candidate(module: nn.Module) -> bool:
    """A known MoE class, a 5.x experts module, or anything holding its experts in a ModuleList: worth a line in the
    report. A transformers 5.x block's line is its experts module's (families/transformers5.py)."""
    if transformers5.delegates_to_experts(module):
        return False
    return family_of(module) is not None or _module_list(module)


def unsupported_reason(block: nn.Module) -> str | None:
    """Why `block` cannot take its family's traceable forward, or None if it can.

    The structural check guards against a same-named class whose layout differs from the one the forward was
    written for (another transformers version, a custom remote-code model).
    """
    family = family_of(block)
    if family is None:
        derived = transformers4_generic.refusal(type(block)) if _module_list(block) else None
        return derived or f"no traceable forward for {type(block).__name__}"
    reason = (family.check or module_list_check)(block)
    if reason is not None:
        return reason
    missing = [a for a in family.attrs if not hasattr(block, a)]
    if missing:
        return f"missing attributes {missing}"
    return None


__all__ = ["FAMILIES", "Family", "family_of", "TRACEABLE_FORWARDS", "is_moe_candidate", "module_list_check",
           "range_expert_loop", "softmax_topk", "unsupported_reason"]

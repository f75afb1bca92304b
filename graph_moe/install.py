"""Swap the forward of each supported MoE block instance for its traceable twin (see graph_moe/families/).

The forward is set on the INSTANCE, never on the class: Unsloth regenerates model classes (class patches would be
lost) and other models of the same class in the process stay untouched. Parameters, buffers and submodules are
not touched, so `state_dict()`, PEFT wrappers, quantized Linears and hooks on the experts keep working.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from typing import Callable

import torch
from torch import nn

from graph_moe import layout_check
from graph_moe.families import TRACEABLE_FORWARDS, family_of, is_moe_candidate, transformers5, unsupported_reason
from graph_moe.families.transformers5 import WRAPPER_FORWARDS
from graph_moe.layout import attach_adapters, keep_tensor_guards, lay_out, remove_layout, usable_layout
from graph_moe.shared_trace import can_share, shared, traceable
from graph_moe.stacked_adapters import stack_adapters, stacked_pairs, unstack_adapters
from graph_moe.stacked_experts import is_stacked

log = logging.getLogger("graph_moe")

INSTALLED_MARK = "_graph_moe_installed"  # instance attribute holding the form label of the replaced loop


@dataclasses.dataclass
class BlockEntry:
    path: str
    class_name: str
    form: str | None
    num_experts: int | None
    top_k: int | None
    status: str  # "installed", "already installed" or "not supported: <reason>"
    weights: str = "-"  # "grouped layout", or why the experts are stacked per forward instead


@dataclasses.dataclass
class InstallReport:
    blocks: list[BlockEntry] = dataclasses.field(default_factory=list)

    @property
    def num_installed(self) -> int:
        return sum(b.status == "installed" for b in self.blocks)

    def __str__(self) -> str:
        header = ("module", "class", "form", "experts", "top_k", "status", "expert weights")
        rows = [header] + [
            (b.path, b.class_name, b.form or "-", str(b.num_experts), str(b.top_k), b.status, b.weights)
            for b in self.blocks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _is_ours(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return traceable(getattr(forward, "__func__", None)) in TRACEABLE_FORWARDS


def _first_int(block: nn.Module, names) -> int | None:
    """The first integer attribute among `names` on the block, its router/gate, or its config (for the report:
    DeepSeek, DBRX, gpt-oss or Granite blocks keep their sizes on the router)."""
    for owner in (block, getattr(block, "router", None), getattr(block, "gate", None), getattr(block, "config", None)):
        for name in names:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _forward_replaced(block: nn.Module) -> bool:
    """An instance forward other than the class's own (restoring libraries, Unsloth's included, may leave the
    class forward bound on the instance: that one is the class's and safe to shadow)."""
    forward = block.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not type(block).forward


def install(model: nn.Module, *, filter_fn: Callable[[str, nn.Module], bool] | None = None,
            layout: bool = True, stack_lora: bool = True, stack_experts: bool = False,
            shared_block_trace: bool = False, keep_transformers_grouped: bool = False) -> InstallReport:
    """Install traceable forwards on every supported MoE block of `model` for which `filter_fn(path, block)` holds.

    Idempotent, and safe after PEFT wrapping: blocks are found wherever they sit in `model.named_modules()`.
    layout: lay frozen plain experts out once for grouped GEMMs (graph_moe/layout.py), so the compiled
        graph reads their weights without a per-forward copy.
    stack_experts: make each block's laid-out expert weights two parameters, `gate_up` (E, 2I, H) and `down`
        (E, H, I), under `<block>.graph_moe_experts` (graph_moe/stacked_experts.py): trained experts then need no
        per-forward copy either, and FSDP2 (install BEFORE `fully_shard`) shards and all-gathers the stacks as they
        are. Create the optimizer after install. Blocks stacked before stay stacked on later installs.
    stack_lora: stack the PEFT LoRA adapters of each expert projection into one parameter per adapter
        (graph_moe/stacked_adapters.py): `model.parameters()` then yields the stacks, so create the optimizer
        after install. Install again after adding adapters to stack them too.
    shared_block_trace: for a model compiled whole (`torch.compile(model, backend=graph_moe.backend)`, the HF
        Trainer's torch_compile): Dynamo traces the MoE blocks of one kind once, not once per layer
        (graph_moe/shared_trace.py). `graph_moe.compile` needs it not. Each install sets it as asked.
    keep_transformers_grouped: leave transformers 5.x experts modules that run transformers' own grouped forward
        (experts_implementation "grouped_mm", the default, or "batched_mm") as they are. By default graph_moe takes
        them over, as it takes over "eager" ones (families/transformers5.py); the report's form column says which
        implementation each replaced.
    """
    report = InstallReport()
    newly_stacked = experts_stacked = unshared = 0
    wrapped_by = {m.base_layer: m for m in model.modules() if isinstance(getattr(m, "base_layer", None), nn.Module)}
    for path, block in model.named_modules():
        if not is_moe_candidate(block) or (filter_fn is not None and not filter_fn(path, block)):
            continue
        family = family_of(block)
        five = family is transformers5.FAMILY
        entry = BlockEntry(
            path=path,
            class_name=type(block).__name__,
            # for a 5.x experts module: the experts_implementation it ran
            form=transformers5.implementation(block) if five else family.form if family else None,
            num_experts=_first_int(block, ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")),
            top_k=_first_int(block, ("top_k", "num_experts_per_tok", "moe_top_k", "moe_topk")),
            status="installed",
        )
        reason = unsupported_reason(block)
        if _is_ours(block):
            entry.status = "already installed"
        elif reason is not None:
            entry.status = f"not supported: {reason}"
        elif five and keep_transformers_grouped and entry.form in transformers5.TRANSFORMERS_GROUPED:
            entry.status = f"left: experts_implementation={entry.form!r} kept (keep_transformers_grouped=True)"
        elif _forward_replaced(block):
            # Someone else (an accelerate hook, Unsloth's grouped forward) owns this instance's forward.
            entry.status = "not supported: forward already replaced on the instance"
        else:
            setattr(block, INSTALLED_MARK, family.form)
        if entry.status.endswith("installed"):  # newly or already: the forward as asked now
            share = shared_block_trace and can_share(block)
            unshared += shared_block_trace and not share
            wanted = shared(family.forward) if share else family.forward
            if getattr(block.__dict__.get("forward"), "__func__", None) is not wanted:
                block.forward = types.MethodType(wanted, block)
        if _is_ours(block):
            was_stacked = is_stacked(block)
            entry.weights = (_lay_out(block, family.projections, stack_experts) if layout
                             else "per expert: layout=False")
            experts_stacked += is_stacked(block) and not was_stacked
            if family.wrappers is not None:
                entry.weights = family.wrappers(block, _wrappers(block, wrapped_by))
            if stack_lora and family.projections is not None:
                newly_stacked += bool(stack_adapters(block, family.projections))
                attach_adapters(block)
            if stacked := stacked_pairs(block):
                entry.weights += f"; LoRA stacked ({stacked} projection x adapter)"
        report.blocks.append(entry)
    if experts_stacked:
        log.warning("graph_moe: the expert weights of %d block(s) are now two parameters each, gate_up and down "
                    "(graph_moe/stacked_experts.py): create the optimizer (and FSDP2's fully_shard) after "
                    "graph_moe.install", experts_stacked)
    if newly_stacked:
        # An optimizer made before holds the per-expert adapter parameters, which no longer get gradients.
        log.warning("graph_moe: the LoRA adapters of the experts in %d block(s) are now one parameter per projection "
                    "and adapter (graph_moe/stacked_adapters.py): create the optimizer after graph_moe.install",
                    newly_stacked)
    if unshared:
        log.warning("graph_moe: shared_block_trace left out %d block(s) with 4-bit experts: this torch's Dynamo (before "
                    "2.13) fails on their shared trace; they are traced layer by layer", unshared)
    if layout_check.watch(model):  # the layouts checked around each call of the model
        keep_tensor_guards()
    log.info(
        "graph_moe: installed %d MoE block(s), %d already installed, %d not supported",
        report.num_installed,
        sum(b.status == "already installed" for b in report.blocks),
        sum(b.status.startswith("not supported") for b in report.blocks),
    )
    return report


def _layout_for_training(block: nn.Module):
    """usable_layout as a training forward sees it (under no_grad it skips the requires_grad checks)."""
    with torch.enable_grad():
        return usable_layout(block)


def _lay_out(block: nn.Module, projections, stacked: bool) -> str:
    if projections is None:
        return "stacked by the model"
    current = _layout_for_training(block)
    if current is None or (stacked and current.owner is None and not current.four_bit):
        why = lay_out(block, projections, stacked)
        if why is not None:
            return f"per expert: {why}"
        current = _layout_for_training(block)
        if current is None:
            return "per expert: the layout's checks fail right after building it"
    if current.owner is not None:
        return "grouped layout, stacked parameters"
    return "grouped layout" + (" (4-bit: stack_experts does not apply)" if stacked and current.four_bit else "")


def _wrappers(block: nn.Module, wrapped_by: dict) -> list[nn.Module]:
    """The modules wrapping `block` through `base_layer` (PEFT tuner layers), outermost first."""
    chain = []
    while block in wrapped_by:
        block = wrapped_by[block]
        chain.append(block)
    return chain[::-1]


def uninstall(model: nn.Module) -> int:
    """Restore the class forward on every block `install` touched; returns how many blocks were restored."""
    restored = 0
    layout_check.unwatch(model)
    for _, block in model.named_modules():
        if _is_ours(block):
            del block.forward
            remove_layout(block)
            unstack_adapters(block)
            restored += 1
        elif getattr(block.__dict__.get("forward"), "__func__", None) in WRAPPER_FORWARDS:
            del block.forward  # a PEFT wrapper bound to an installed block's forward
        if INSTALLED_MARK in block.__dict__:
            delattr(block, INSTALLED_MARK)
    return restored

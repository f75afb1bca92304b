"""What every family's traceable forward shares: the Family record, the range expert loop, softmax top-k routing.

A traceable forward reproduces its class's forward op for op (routing, dtypes, jitter, shared experts, returned
tuple), except that the expert loop becomes `range_expert_loop`: a static loop over every expert that Dynamo
unrolls into one graph (with `capture_dynamic_output_shape_ops=True`) and the pass rewrites into grouped GEMMs.
Visiting every expert in ascending order adds the same terms in the same order as transformers' loops (an
expert without tokens adds nothing), so outputs are bit-identical to the original forward in eager.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Family:
    forward: Callable
    form: str  # loop form of the class forward it replaces (docs/design.md, "Loop forms"): "H", "R", "R'", "D", "S", "G", "B"
    attrs: tuple[str, ...]  # block attributes the forward reads beyond gate/experts/top_k/num_experts
    projections: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")  # gate, up, down of each
    # ModuleList expert, for the grouped layout (layout.py); None when the weights are already stacked.
    check: Callable[[nn.Module], str | None] | None = None  # why a block cannot take `forward`; None: module_list_check
    wrappers: Callable[[nn.Module, list[nn.Module]], str] | None = None  # given the installed block and the modules
    # wrapping it through `base_layer` (PEFT ParamWrappers), outermost first: take over their work; the report's text


def module_list_check(block: nn.Module, router: str = "gate") -> str | None:
    """Structure the 4.x ModuleList blocks share: experts in a ModuleList, num_experts, top_k, and a Linear
    router named `router` with num_experts outputs."""
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.ModuleList):
        return "experts is not an nn.ModuleList"
    num_experts = getattr(block, "num_experts", None)
    if not isinstance(num_experts, int) or num_experts != len(experts):
        return f"num_experts={num_experts!r} does not match len(experts)={len(experts)}"
    if not isinstance(getattr(block, "top_k", None), int):
        return "no integer top_k"
    gate = getattr(block, router, None)
    # A PEFT-wrapped router (LoRA on "gate") still routes through a Linear underneath.
    base_gate = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate
    if not isinstance(base_gate, nn.Linear) or base_gate.out_features != num_experts:
        return f"{router} is not an nn.Linear router with num_experts outputs"
    return None


def range_expert_loop(experts, hidden_states, routing_weights, selected_experts, num_experts, layout=None):
    """hidden_states (T, H); routing_weights (T, K) already in hidden dtype; selected_experts (T, K) int64.

    With a current `layout` (frozen experts laid out for grouped GEMMs, see layout.py) expert e reads its
    weights as slices of the layout's stacked tensors, which the pass then uses without a copy (4-bit experts:
    stacks dequantized once per forward, one call per projection).
    """
    final_hidden_states = torch.zeros((hidden_states.shape[0], hidden_states.shape[-1]), dtype=hidden_states.dtype, device=hidden_states.device)
    loop = ModuleListLoop(experts, num_experts, layout)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
    for expert_idx in range(loop.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[top_x]
        current_hidden_states = loop.expert(expert_idx, current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, to_dtype(current_hidden_states, hidden_states.dtype))
    return loop.result(final_hidden_states)


class ModuleListLoop:
    """What a range loop over ModuleList experts asks of graph_moe, per forward: how many experts to visit (every
    one, or expert 0 alone, whose body then stands for all: `trace_once`), expert e's output, and the loop's result.
    Shared by `range_expert_loop` and the loops derived from 4.x blocks' own forwards (transformers4_generic.py)."""

    def __init__(self, experts: nn.ModuleList, num_experts: int, layout=None):
        self.total, self.layout = num_experts, layout
        self.stacks = layout.stacks() if layout is not None else None
        self.modules = modules_read(experts, layout)
        self.once = trace_once(layout, self.modules)
        self.num_experts = 1 if self.once else num_experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows `x`: from slices of the layout's stacks while it is current, else its module."""
        if self.layout is None:
            return self.modules[e](x)
        return self.layout.expert(e, x, self.modules, self.stacks)

    def result(self, accumulator: torch.Tensor) -> torch.Tensor:
        if self.once:  # expert 0's body stands for every expert's; the pass groups it over all of them (passes/traced_once.py)
            return torch.ops.graph_moe.every_expert_as_expert_0(accumulator, self.total,
                                                                self.layout.per_expert_stacks(self.stacks))
        return accumulator


# Set by graph_moe.compile's regions around each call (compile.py): their backend's pass rewrites a loop traced once.
TRACE_EXPERTS_ONCE = False
# Set by graph_moe.compile's regions around each call: each decoder layer is its own graph (shared_trace.py's twins
# then call the plain forward).
IN_GRAPH_MOE_REGION = False


def trace_once_requested() -> bool:
    """Under Dynamo, for graph_moe's backend: a loop whose bodies are expert 0's reading row e of some stacks may be
    traced as expert 0's body alone, marked with graph_moe::every_expert_as_expert_0 (passes/traced_once.py)."""
    return TRACE_EXPERTS_ONCE and torch.compiler.is_compiling()


def modules_read(experts: nn.ModuleList, layout) -> list[nn.Module]:
    """The expert modules an expert loop reads: expert 0 alone where the layout was verified uniform just before this
    call (every body then reads expert 0's PEFT state, `ExpertLayout.expert`), so Dynamo guards no per-expert key;
    else all of them, walked once (not E calls of ModuleList.__getitem__ for Dynamo to trace)."""
    return [experts[0]] if layout is not None and layout.verified_uniform else list(experts)


def trace_once(layout, expert_modules) -> bool:
    """Trace expert 0's body alone: when every body is expert 0's reading row e of the layout's stacks (read by
    Dynamo, so guarded)."""
    return trace_once_requested() and layout is not None and layout.uniform(expert_modules)


def gated_experts(block: nn.Module) -> nn.ModuleList:
    """The experts a grouped layout and stacked adapters cover: `block.experts` without trailing nn.Identity "zero
    experts" (LongCat-Flash's, which its forward adds outside the loop)."""
    experts = block.experts
    count = len(experts)
    while count and type(experts[count - 1]) is nn.Identity:
        count -= 1
    return experts[:count]


def to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without the no-op: Dynamo traces every op of the E unrolled bodies, and each one it
    does not see (a cast to the dtype a tensor already has) is compile time saved, E times per layer."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def softmax_topk(router_logits, top_k, normalize, dtype):
    """Softmax in fp32, top-k, optional renormalisation, cast back to the hidden dtype."""
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    if normalize:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(dtype), selected_experts

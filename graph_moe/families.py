"""Traceable forwards for the transformers 4.x sparse-MoE block classes.

Each forward reproduces its class's forward from transformers 4.57.6 op for op (routing, dtypes, jitter,
shared expert, returned tuple), except that the expert loop is `range_expert_loop`: a static loop over every
expert that Dynamo unrolls into one graph (with `capture_dynamic_output_shape_ops=True`), where the 4.53+
`expert_hit = (...).nonzero()` loop ("H") runs in Python between graph breaks. Visiting every expert in
ascending order adds the same terms in the same order as the H loop, so outputs are bit-identical.

Classes are looked up by NAME, so Unsloth's regenerated copies of these classes match too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.layout import usable_layout


def range_expert_loop(experts, hidden_states, routing_weights, selected_experts, num_experts, layout=None):
    """hidden_states (T, H); routing_weights (T, K) already in hidden dtype; selected_experts (T, K) int64.

    With a current `layout` (frozen experts laid out for grouped GEMMs, see layout.py) expert e reads its
    weights as slices of the layout's stacked tensors, which the pass then uses without a copy.
    """
    final_hidden_states = torch.zeros((hidden_states.shape[0], hidden_states.shape[-1]), dtype=hidden_states.dtype, device=hidden_states.device)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
    for expert_idx in range(num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
        expert = experts[expert_idx]
        expert_out = expert(current_state) if layout is None else layout.expert(expert_idx, current_state, expert)
        current_hidden_states = expert_out * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    return final_hidden_states


def _route(router_logits, top_k, normalize, dtype):
    """Softmax in fp32, top-k, optional renormalisation, cast back to the hidden dtype."""
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    if normalize:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights.to(dtype), selected_experts


def mixtral_forward(self, hidden_states: torch.Tensor):
    """MixtralSparseMoeBlock / MiniMaxSparseMoeBlock: always renormalised, training-time input jitter."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    if self.training and self.jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights, selected_experts = _route(router_logits, self.top_k, True, hidden_states.dtype)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self)
    )
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def qwen_olmoe_forward(self, hidden_states: torch.Tensor):
    """Qwen3MoeSparseMoeBlock / OlmoeSparseMoeBlock / FlexOlmoSparseMoeBlock: renormalised iff norm_topk_prob."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights, selected_experts = _route(router_logits, self.top_k, self.norm_topk_prob, hidden_states.dtype)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self)
    )
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def qwen2_moe_forward(self, hidden_states: torch.Tensor):
    """Qwen2MoeSparseMoeBlock: as Qwen3, plus a dense shared expert gated by sigmoid(shared_expert_gate(x))."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights, selected_experts = _route(router_logits, self.top_k, self.norm_topk_prob, hidden_states.dtype)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self)
    )
    shared_expert_output = self.shared_expert(hidden_states)
    shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
    final_hidden_states = final_hidden_states + shared_expert_output
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


@dataclasses.dataclass(frozen=True)
class Family:
    forward: Callable
    form: str  # loop form of the class forward it replaces: "H" (expert_hit, 4.53+) or "R" (range loop)
    attrs: tuple[str, ...]  # block attributes the forward reads beyond gate/experts/top_k/num_experts
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # each expert's gate, up, down


FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family(mixtral_forward, "H", ("jitter_noise",), ("w1", "w3", "w2")),
    "MiniMaxSparseMoeBlock": Family(mixtral_forward, "H", ("jitter_noise",), ("w1", "w3", "w2")),
    "Qwen2MoeSparseMoeBlock": Family(qwen2_moe_forward, "H", ("norm_topk_prob", "shared_expert", "shared_expert_gate")),
    "Qwen3MoeSparseMoeBlock": Family(qwen_olmoe_forward, "H", ("norm_topk_prob",)),
    "OlmoeSparseMoeBlock": Family(qwen_olmoe_forward, "R", ("norm_topk_prob",)),
    "FlexOlmoSparseMoeBlock": Family(qwen_olmoe_forward, "R", ("norm_topk_prob",)),
}

TRACEABLE_FORWARDS = frozenset(f.forward for f in FAMILIES.values())


def is_moe_candidate(module: nn.Module) -> bool:
    """Anything holding its experts in a ModuleList is worth a line in the report, supported or not."""
    return isinstance(getattr(module, "experts", None), nn.ModuleList)


def unsupported_reason(block: nn.Module) -> str | None:
    """Why `block` cannot take its family's traceable forward, or None if it can.

    The structural check guards against a same-named class whose layout differs from the one the forward was
    written for (another transformers version, a custom remote-code model).
    """
    name = type(block).__name__
    family = FAMILIES.get(name)
    if family is None:
        return f"no traceable forward for {name}"
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.ModuleList):
        return "experts is not an nn.ModuleList"
    num_experts = getattr(block, "num_experts", None)
    if not isinstance(num_experts, int) or num_experts != len(experts):
        return f"num_experts={num_experts!r} does not match len(experts)={len(experts)}"
    if not isinstance(getattr(block, "top_k", None), int):
        return "no integer top_k"
    gate = getattr(block, "gate", None)
    # A PEFT-wrapped router (LoRA on "gate") still routes through a Linear underneath.
    base_gate = gate.get_base_layer() if hasattr(gate, "get_base_layer") else gate
    if not isinstance(base_gate, nn.Linear) or base_gate.out_features != num_experts:
        return "gate is not an nn.Linear router with num_experts outputs"
    missing = [a for a in family.attrs if not hasattr(block, a)]
    if missing:
        return f"missing attributes {missing}"
    return None

"""Ernie 4.5 MoE (transformers 4.x, `Ernie4_5_MoeSparseMoeBlock`): ModuleList experts, an fp32 router whose top-k
reads the scores plus a correction bias (`moe_statics`) while the weights come from the scores themselves,
renormalised with a floor (`moe_norm_min`), and optional dense shared experts added after the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graph_moe.families.common import Family, module_list_check, range_expert_loop
from graph_moe.layout import usable_layout


def ernie_forward(self, hidden_states: torch.Tensor):
    """The block's forward, op for op, with the expert loop over every expert (`range_expert_loop`)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    if self.shared_experts is not None:
        shared_output = self.shared_experts(hidden_states)
    device_type = hidden_states.device.type if hidden_states.device.type != "mps" else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):  # the router runs in float32, as transformers'
        router_logits = self.gate(hidden_states.float())
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        _, selected_experts = torch.topk(self.moe_statics(routing_weights), self.top_k, dim=-1)
        routing_weights = torch.gather(routing_weights, dim=-1, index=selected_experts)
        routing_weights = routing_weights / torch.clamp(routing_weights.sum(dim=-1, keepdim=True), min=self.norm_min)
        routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self)
    )
    if self.shared_experts is not None:
        final_hidden_states = final_hidden_states + shared_output
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def ernie_check(block) -> str | None:
    """The ModuleList structure, and the router parts the forward reads."""
    why = module_list_check(block)
    if why is None and not isinstance(getattr(block, "norm_min", None), (int, float)):
        why = "no numeric norm_min"
    return why


FAMILIES = {
    "Ernie4_5_MoeSparseMoeBlock": Family(ernie_forward, "H", ("moe_statics", "shared_experts"), check=ernie_check),
}

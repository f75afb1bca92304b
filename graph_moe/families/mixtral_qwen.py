"""Mixtral, MiniMax, Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo (transformers 4.x): ModuleList experts, softmax top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graph_moe.families.common import Family, range_expert_loop, softmax_topk
from graph_moe.layout import usable_layout


def mixtral_forward(self, hidden_states: torch.Tensor):
    """MixtralSparseMoeBlock / MiniMaxSparseMoeBlock: always renormalised, training-time input jitter."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    if self.training and self.jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights, selected_experts = softmax_topk(router_logits, self.top_k, True, hidden_states.dtype)
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
    routing_weights, selected_experts = softmax_topk(router_logits, self.top_k, self.norm_topk_prob, hidden_states.dtype)
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
    routing_weights, selected_experts = softmax_topk(router_logits, self.top_k, self.norm_topk_prob, hidden_states.dtype)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self)
    )
    shared_expert_output = self.shared_expert(hidden_states)
    shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
    final_hidden_states = final_hidden_states + shared_expert_output
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


FAMILIES = {
    "MixtralSparseMoeBlock": Family(mixtral_forward, "H", ("jitter_noise",), ("w1", "w3", "w2")),
    "MiniMaxSparseMoeBlock": Family(mixtral_forward, "H", ("jitter_noise",), ("w1", "w3", "w2")),
    "Qwen2MoeSparseMoeBlock": Family(qwen2_moe_forward, "H", ("norm_topk_prob", "shared_expert", "shared_expert_gate")),
    "Qwen3MoeSparseMoeBlock": Family(qwen_olmoe_forward, "H", ("norm_topk_prob",)),
    "OlmoeSparseMoeBlock": Family(qwen_olmoe_forward, "R", ("norm_topk_prob",)),
    "FlexOlmoSparseMoeBlock": Family(qwen_olmoe_forward, "R", ("norm_topk_prob",)),
}

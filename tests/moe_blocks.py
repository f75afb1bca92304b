"""Small MoE blocks in the range-loop form, for tests: configurable experts, one or two blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


class Expert(nn.Module):
    def __init__(self, hidden, inter, gated=True, bias=False, act="silu"):
        super().__init__()
        self.gated = gated
        self.act = ACTIVATIONS[act]
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        if gated:
            self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


class RangeMoE(nn.Module):
    """OLMoE's loop: softmax router, top-k, a range loop over every expert, index_add_."""

    def __init__(self, hidden=16, inter=32, num_experts=4, top_k=2, norm_topk_prob=True, float32_weights=False,
                 **expert_kw):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.float32_weights = float32_weights  # routing weights left in float32 (transformers 5.x Mixtral)
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inter, **expert_kw) for _ in range(num_experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        routing_weights = F.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            current = hidden_states[None, top_x].reshape(-1, shape[-1])
            out = self.experts[e](current) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, out.to(hidden_states.dtype))
        return final.reshape(shape)


class TwoBlocks(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.a = RangeMoE(**kw)
        self.b = RangeMoE(**kw)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + x

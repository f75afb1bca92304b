"""Form D (DeepSeek-V3, Dots1, GLM4-MoE, GLM4V-MoE, LongCat-Flash) and form S (DeepSeek-V2), transformers 4.x.

Form D loops `for e in range(len(self.experts))` over an (E, T, K) mask with an `if numel() > 0` guard, weights
each expert's rows by the router's fp32 weights and accumulates in fp32. Form S sorts the (token, slot) pairs by
expert, runs each non-empty expert on its slice, and sums the weighted slots in fp32. Both become the static
range loop the pass rewrites, with the fp32 accumulator kept (the grouped combine then sums in fp32 too).

Routing is not rewritten: the forwards call the block's own router module, so sigmoid scoring, the correction
bias, group-limited top-k, renormalisation and `routed_scaling_factor` are exactly transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.families.common import Family, modules_read, trace_once
from graph_moe.layout import usable_layout


def fp32_expert_loop(experts, hidden_states, topk_indices, topk_weights, num_experts, layout=None):
    """Form D's loop without the empty-expert guard (an empty expert adds nothing): hidden_states (T, H),
    topk_indices (T, K), topk_weights (T, K) in the router's dtype, which is also the accumulator's.

    Returns the (T, H) sum in the accumulator dtype; the caller casts back as its class does.
    """
    final_hidden_states = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
    stacks = layout.stacks() if layout is not None else None
    expert_mask = F.one_hot(topk_indices, num_classes=num_experts).permute(2, 0, 1)  # (E, T, K), as transformers
    expert_modules = modules_read(experts, layout)
    once = trace_once(layout, expert_modules)  # expert 0's body standing for all (passes/traced_once.py)
    for expert_idx in range(1 if once else num_experts):
        token_indices, weight_indices = torch.where(expert_mask[expert_idx])
        expert_weights = topk_weights[token_indices, weight_indices]
        expert_input = hidden_states[token_indices]
        if layout is None:
            expert_output = expert_modules[expert_idx](expert_input)
        else:
            expert_output = layout.expert(expert_idx, expert_input, expert_modules, stacks)
        # bf16 rows times fp32 weights promote to fp32, as in the class's loop (and form S's `.type(fp32).mul_`).
        final_hidden_states.index_add_(0, token_indices, expert_output * expert_weights.unsqueeze(-1))
    if once:
        return torch.ops.graph_moe.every_expert_as_expert_0(final_hidden_states, num_experts,
                                                            layout.per_expert_stacks(stacks))
    return final_hidden_states


def shared_experts_forward(self, hidden_states: torch.Tensor):
    """Routed experts plus ungated shared experts: DeepseekV3MoE, Dots1MoE, Glm4MoeMoE, Glm4vMoeTextMoE (form D)
    and DeepseekV2MoE (form S), whose forwards differ only in their loops.

    Form S sums the K weighted slots of a token in slot order; this loop adds them in expert order. Both are fp32
    sums of the same fp32 terms (bit-identical for top-2, where the order cannot matter), then cast to bf16.
    """
    residuals = hidden_states
    orig_shape = hidden_states.shape
    topk_indices, topk_weights = self.gate(hidden_states)
    hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
    routed = fp32_expert_loop(self.experts, hidden_states, topk_indices, topk_weights, len(self.experts),
                              usable_layout(self))
    hidden_states = routed.type(hidden_states.dtype).view(*orig_shape)
    return hidden_states + self.shared_experts(residuals)


def longcat_flash_forward(self, hidden_states: torch.Tensor):
    """LongcatFlashMoE: `n_routed_experts` MLP experts, then `zero_expert_num` nn.Identity "zero experts".

    A slot routed to a zero expert adds weight * x. That term is computed outside the loop, once for all zero
    slots of a token; in the loop such a slot goes to MLP expert (id mod n_routed_experts) with weight 0, which
    adds exact zeros (and zero gradients), so the loop has only MLP experts and K slots per token, as the pass
    requires. The cost: MLP rows for the zero slots that the class skips.
    """
    orig_shape = hidden_states.shape
    topk_indices, topk_weights = self.router(hidden_states)
    hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
    num_mlp = self.config.n_routed_experts
    if len(self.experts) == num_mlp:  # no zero experts: plain form D
        routed = fp32_expert_loop(self.experts, hidden_states, topk_indices, topk_weights, num_mlp,
                                  usable_layout(self))
        return routed.type(hidden_states.dtype).view(*orig_shape)
    to_zero_expert = topk_indices >= num_mlp
    mlp_indices = torch.remainder(topk_indices, num_mlp)
    mlp_weights = topk_weights.masked_fill(to_zero_expert, 0.0)
    zero_expert_weight = topk_weights.masked_fill(~to_zero_expert, 0.0).sum(dim=-1, keepdim=True)
    routed = fp32_expert_loop(list(self.experts)[:num_mlp], hidden_states, mlp_indices, mlp_weights, num_mlp,
                              usable_layout(self))
    routed = routed + hidden_states * zero_expert_weight
    return routed.type(hidden_states.dtype).view(*orig_shape)


def _experts_check(experts, num_experts) -> str | None:
    if not isinstance(experts, nn.ModuleList):
        return "experts is not an nn.ModuleList"
    if not isinstance(num_experts, int) or num_experts != len(experts):
        return f"the router has {num_experts!r} experts but experts holds {len(experts)}"
    return None


def _shared_experts_check(block) -> str | None:
    if not isinstance(getattr(block, "shared_experts", None), nn.Module):
        return "no shared_experts module"
    return None


def topk_router_check(block: nn.Module) -> str | None:
    """Form D blocks: a TopkRouter `gate` (returns fp32 (indices, weights)), ModuleList experts, shared experts."""
    gate = getattr(block, "gate", None)
    if not isinstance(gate, nn.Module) or not hasattr(gate, "e_score_correction_bias"):
        return "gate is not a top-k router with a correction bias"
    if not isinstance(getattr(gate, "top_k", None), int):
        return "the router has no integer top_k"
    return _experts_check(getattr(block, "experts", None), getattr(gate, "n_routed_experts", None)) \
        or _shared_experts_check(block)


def deepseek_v2_check(block: nn.Module) -> str | None:
    """DeepseekV2MoE: a DeepseekV2MoEGate `gate`, ModuleList experts on one expert-parallel rank, shared experts."""
    gate = getattr(block, "gate", None)
    if not isinstance(gate, nn.Module) or not isinstance(getattr(gate, "top_k", None), int):
        return "gate is not a top-k router"
    if getattr(block, "ep_rank", 0) != 0:
        return f"expert-parallel rank {block.ep_rank} (the forward indexes experts from rank 0)"
    return _experts_check(getattr(block, "experts", None), getattr(gate, "num_experts", None)) \
        or _shared_experts_check(block)


def longcat_flash_check(block: nn.Module) -> str | None:
    """LongcatFlashMoE: `n_routed_experts` MLP experts first, then only nn.Identity zero experts."""
    router = getattr(block, "router", None)
    config = getattr(block, "config", None)
    num_mlp = getattr(config, "n_routed_experts", None)
    if not isinstance(router, nn.Module) or not isinstance(getattr(router, "top_k", None), int):
        return "router is not a top-k router"
    experts = getattr(block, "experts", None)
    reason = _experts_check(experts, getattr(router, "n_routed_experts", None))
    if reason is not None:
        return reason
    if not isinstance(num_mlp, int) or not 0 < num_mlp <= len(experts):
        return f"config.n_routed_experts={num_mlp!r} does not fit {len(experts)} experts"
    if any(isinstance(e, nn.Identity) for e in experts[:num_mlp]):
        return "a zero (identity) expert among the first n_routed_experts"
    if not all(type(e) is nn.Identity for e in experts[num_mlp:]):
        return "experts past n_routed_experts are not all nn.Identity zero experts"
    return None


FAMILIES = {
    "DeepseekV3MoE": Family(shared_experts_forward, "D", (), check=topk_router_check),
    "Dots1MoE": Family(shared_experts_forward, "D", (), check=topk_router_check),
    "Glm4MoeMoE": Family(shared_experts_forward, "D", (), check=topk_router_check),
    "Glm4vMoeTextMoE": Family(shared_experts_forward, "D", (), check=topk_router_check),
    "LongcatFlashMoE": Family(longcat_flash_forward, "D", ("config",), check=longcat_flash_check),
    "DeepseekV2MoE": Family(shared_experts_forward, "S", (), check=deepseek_v2_check),
}

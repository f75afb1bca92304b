"""3D-weight experts in transformers 4.x: gpt-oss, Qwen3-VL-MoE, Llama4 (weights (E, in, out), used as x @ w[e]).

Their experts are already stacked parameters, `gate_up_proj` (E, H, 2I) and `down_proj` (E, I, H) (gpt-oss adds
per-expert biases (E, 2I) and (E, H)). The traceable forwards run the range loop the pass groups, with expert e
computing `x @ gate_up_proj[e]` ... `@ down_proj[e]` (+ `bias[e]`): the pass hands the parameters themselves to
torch._grouped_mm (no transpose, no copy) and each bias as a gather `bias[expert_of_row]`.

- gpt-oss (`GptOssMLP`): transformers loops over the experts hit (Form H) on CPU or in training, and otherwise
  runs every expert on every token (`bmm`, Form B) and multiplies by the dense (T, E) routing scores, which are
  zero outside the top-k. The traceable forward is the loop path op for op (bit-identical in eager); the dense
  path adds the same nonzero terms, so it agrees within bf16 rounding.
- Qwen3-VL-MoE (`Qwen3VLMoeTextSparseMoeBlock`): the same two paths, chosen by `self.training`.
- Llama4 (`Llama4TextMoe`): only the dense path, where the router score (sigmoid of the top-k logits, the other
  logits set to -inf first) multiplies the expert's INPUT. Why computing only the routed experts is exact: a
  token not routed to expert e gets score sigmoid(-inf) = 0 exactly, so its input row is x * 0 = ±0, gate and up
  are ±0 rows (a matmul of a zero row), `up * act(gate)` is ±0 for any activation finite at 0, and the down
  projection is a ±0 row: it adds nothing to the sum over experts. (This needs finite weights and inputs: an inf
  would make the dense path NaN.) transformers sums the E expert outputs with `sum(dim=0)`, which accumulates in
  fp32 and rounds once; the traceable forward accumulates its k routed terms in fp32 too and rounds once.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.families.common import Family, trace_once_requested


def stacked_expert_loop(hidden_states: torch.Tensor, routing_weights: torch.Tensor, selected_experts: torch.Tensor,
                        num_experts: int, expert: Callable[[int, torch.Tensor], torch.Tensor],
                        stacks: list[torch.Tensor], *, scale_input: bool = False,
                        accumulate_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The range loop over every expert, `expert(e, rows)` computing expert e's MLP from row e of each of `stacks`
    (all it reads per expert: under graph_moe.compile only expert 0's body is traced, passes/traced_once.py).

    hidden_states (T, H); routing_weights (T, K) in the hidden dtype; selected_experts (T, K).
    scale_input: the routing weight multiplies the expert's input (Llama4), not its output.
    accumulate_dtype: the dtype of the sum over experts (default: the hidden dtype, as index_add_ in transformers).
    """
    dtype = accumulate_dtype or hidden_states.dtype
    output = torch.zeros((hidden_states.shape[0], hidden_states.shape[-1]), dtype=dtype, device=hidden_states.device)
    expert_mask = F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0)
    once = trace_once_requested()
    for expert_idx in range(1 if once else num_experts):
        slot, token = torch.where(expert_mask[expert_idx])
        rows = hidden_states[token]
        weight = routing_weights[token, slot, None]
        rows_out = expert(expert_idx, rows * weight) if scale_input else expert(expert_idx, rows) * weight
        output.index_add_(0, token, rows_out.to(dtype))
    if once:
        return torch.ops.graph_moe.every_expert_as_expert_0(output, num_experts, stacks)
    return output


# ----------------------------------------------------------------------------------------------- gpt-oss


def _gpt_oss_expert(experts: nn.Module):
    def expert(e, rows):
        # GptOssExperts.forward, loop path: interleaved gate/up, clamped SwiGLU, biases.
        gate_up = rows @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        glu = gate * torch.sigmoid(gate * experts.alpha)
        return ((up + 1) * glu) @ experts.down_proj[e] + experts.down_proj_bias[e]
    return expert


def gpt_oss_forward(self, hidden_states: torch.Tensor):
    """GptOssMLP: router (linear + bias, top-k on the logits, softmax over the k) then the experts."""
    router_scores, router_indices = self.router(hidden_states)  # (T, E) dense, zero outside the top-k
    experts = self.experts
    batch_size = hidden_states.shape[0]
    hidden_states = hidden_states.reshape(-1, experts.hidden_size)
    # The loop reads routing_weights[token, expert]: the top-k values, exactly as scattered.
    routing_weights = router_scores.gather(1, router_indices)
    next_states = stacked_expert_loop(hidden_states, routing_weights, router_indices, router_scores.shape[1],
                                      _gpt_oss_expert(experts), [experts.gate_up_proj, experts.gate_up_proj_bias,
                                                                 experts.down_proj, experts.down_proj_bias])
    return next_states.view(batch_size, -1, experts.hidden_size), router_scores


def _gpt_oss_check(block: nn.Module) -> str | None:
    router, experts = getattr(block, "router", None), getattr(block, "experts", None)
    if router is None or experts is None:
        return "no router or experts"
    weight, bias = getattr(router, "weight", None), getattr(router, "bias", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or not isinstance(
            getattr(router, "top_k", None), int):
        return "router is not a linear with bias and an integer top_k"
    num_experts = weight.shape[0]
    why = _stacked_check(experts, num_experts, ("hidden_states", "router_indices", "routing_weights"),
                         ("gate_up_proj_bias", "down_proj_bias"))
    if why:
        return why
    if not all(isinstance(getattr(experts, a, None), float) for a in ("alpha", "limit")):
        return "experts have no float alpha and limit"
    if experts.gate_up_proj.shape[-1] % 2:
        return "gate_up_proj has an odd width"
    return None


# ----------------------------------------------------------------------------------------------- Qwen3-VL-MoE


def _gated_expert(experts: nn.Module):
    def expert(e, rows):
        # Qwen3VLMoeTextExperts / Llama4TextExperts: gate and up concatenated, up * act(gate).
        gate, up = (rows @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * experts.act_fn(gate)) @ experts.down_proj[e]
    return expert


def qwen3_vl_moe_forward(self, hidden_states: torch.Tensor):
    """Qwen3VLMoeTextSparseMoeBlock: softmax in fp32, top-k, always renormalised, cast to the hidden dtype."""
    batch_size = hidden_states.shape[0]
    hidden_states = hidden_states.reshape(-1, self.hidden_size)
    router_logits = self.gate(hidden_states)
    routing_weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
    routing_weights, router_indices = torch.topk(routing_weights, self.top_k, dim=-1)
    routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    next_states = stacked_expert_loop(hidden_states, routing_weights, router_indices, self.num_experts,
                                      _gated_expert(self.experts), [self.experts.gate_up_proj, self.experts.down_proj])
    return next_states.view(batch_size, -1, self.hidden_size), router_logits


def _qwen3_vl_moe_check(block: nn.Module) -> str | None:
    num_experts, gate = getattr(block, "num_experts", None), getattr(block, "gate", None)
    if not isinstance(num_experts, int) or not isinstance(getattr(block, "top_k", None), int):
        return "no integer num_experts and top_k"
    if not isinstance(gate, nn.Linear) or gate.out_features != num_experts:
        return "gate is not an nn.Linear router with num_experts outputs"
    return _stacked_check(getattr(block, "experts", None), num_experts,
                          ("hidden_states", "routing_weights", "router_indices"), gated=True)


# ----------------------------------------------------------------------------------------------- Llama4


def llama4_forward(self, hidden_states: torch.Tensor):
    """Llama4TextMoe: sigmoid router scores scale each routed expert's input; plus the shared expert."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # (T, E): sigmoid(top-k logits), 0 elsewhere
    # The router's own top-k on the same logits (deterministic), to know which experts each token uses.
    router_indices = torch.topk(router_logits, self.router.top_k, dim=1).indices
    routing_weights = router_scores.gather(1, router_indices)
    routed_out = stacked_expert_loop(hidden_states, routing_weights, router_indices, router_scores.shape[1],
                                     _gated_expert(self.experts), [self.experts.gate_up_proj, self.experts.down_proj],
                                     scale_input=True, accumulate_dtype=torch.float32)
    out = self.shared_expert(hidden_states)
    out.add_(routed_out.to(hidden_states.dtype))
    return out, router_logits


def _llama4_check(block: nn.Module) -> str | None:
    router = getattr(block, "router", None)
    if not isinstance(router, nn.Linear) or not isinstance(getattr(router, "top_k", None), int):
        return "router is not an nn.Linear with an integer top_k"
    if router.bias is not None:
        return "router has a bias"
    if not isinstance(getattr(block, "shared_expert", None), nn.Module):
        return "no shared_expert"
    return _stacked_check(getattr(block, "experts", None), router.out_features, ("hidden_states",), gated=True)


# ----------------------------------------------------------------------------------------------- shared


def _stacked_check(experts, num_experts: int, arguments: tuple[str, ...], biases: tuple[str, ...] = (),
                   gated: bool = False) -> str | None:
    """experts holds gate_up_proj (E, H, 2I), down_proj (E, I, H) and optional biases (E, 2I), (E, H), and its class
    forward takes transformers 4.x's `arguments` (5.x's experts of the same names take top_k_index, top_k_weights
    and hold (E, 2I, H) weights: families/transformers5.py)."""
    if not isinstance(experts, nn.Module):
        return "experts is not a module"
    if tuple(inspect.signature(type(experts).forward).parameters)[1:] != arguments:
        return f"{type(experts).__name__}.forward does not take transformers 4.x's arguments {arguments}"
    if experts._forward_hooks or experts._forward_pre_hooks:
        return "the experts module has hooks (the traceable forward does not call it)"
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3 and down.dim() == 3):
        return "experts have no 3-D gate_up_proj and down_proj parameters"
    experts_n, hidden, two_inter = gate_up.shape
    if experts_n != num_experts or tuple(down.shape) != (num_experts, two_inter // 2, hidden) or two_inter % 2:
        return (f"expert weights of shapes {tuple(gate_up.shape)} and {tuple(down.shape)} are not "
                f"({num_experts}, H, 2I) and ({num_experts}, I, H)")
    if getattr(experts, "hidden_size", hidden) != hidden:
        return "experts.hidden_size does not match the weights"
    for name, shape in zip(biases, ((num_experts, two_inter), (num_experts, hidden))):
        bias = getattr(experts, name, None)
        if not isinstance(bias, nn.Parameter) or tuple(bias.shape) != shape:
            return f"experts.{name} is not a {shape} parameter"
    if gated and not callable(getattr(experts, "act_fn", None)):
        return "experts have no act_fn"
    return None


FAMILIES = {
    "GptOssMLP": Family(gpt_oss_forward, "H/B", ("router",), None, _gpt_oss_check),
    "Qwen3VLMoeTextSparseMoeBlock": Family(qwen3_vl_moe_forward, "H/B", ("hidden_size",), None, _qwen3_vl_moe_check),
    "Llama4TextMoe": Family(llama4_forward, "B", ("router", "shared_expert", "hidden_dim"), None, _llama4_check),
}

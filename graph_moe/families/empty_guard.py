"""Form R′ (PhiMoE, Jamba, DBRX): the range loop with an empty-expert guard.

transformers' loop skips an expert without tokens (`if top_x.shape[0] == 0: continue`), a branch on a
data-dependent size that no Dynamo graph can hold. The traceable forwards drop the guard: an expert without
tokens gathers no rows and `index_add_` adds nothing, so visiting every expert in ascending order adds the
same terms in the same order, and outputs are bit-identical to the class forward in eager.

DBRX stores its experts as three 2-D parameters `w1`, `v1`, `w2` of shape (E * ffn, hidden). Its forward
reads expert e as a slice `stack[e]` of an (E, out, in) view, which the pass hands to torch._grouped_mm as it
is: `w1` and `v1` viewed as (E, ffn, hidden) are Linear weights already; `w2` is applied as `x @ w2[e]`, so
the forward views it as (E, hidden, ffn) (a transpose, no copy) and applies `F.linear`, which computes the
same matmul.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.families.common import Family, module_list_check, range_expert_loop, softmax_topk
from graph_moe.layout import usable_layout


def _sparsemixer():
    """PhiMoE's own router function (top-2 masked softmax; Gumbel sampling and its gradient estimator in
    training), so the routing is exactly the model's, in both modes."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer


def phimoe_forward(self, hidden_states: torch.Tensor):
    """PhimoeSparseMoeBlock: sparsemixer routing (weights stay in the hidden dtype), training-time input jitter."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    if self.training and self.input_jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(
            1.0 - self.input_jitter_noise, 1.0 + self.input_jitter_noise)
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights, selected_experts = _sparsemixer()(
        router_logits, jitter_eps=self.router_jitter_noise, training=self.training)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self))
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def jamba_forward(self, hidden_states: torch.Tensor):
    """JambaSparseMoeBlock: router `self.router`, softmax top-k without renormalisation."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.router(hidden_states)
    routing_weights, selected_experts = softmax_topk(router_logits, self.top_k, False, hidden_states.dtype)
    final_hidden_states = range_expert_loop(
        self.experts, hidden_states, routing_weights, selected_experts, self.num_experts, usable_layout(self))
    final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
    return final_hidden_states, router_logits


def dbrx_forward(self, x: torch.Tensor):
    """DbrxFFN: DbrxRouter (its training jitter scales `x` in place, so the experts see it too), then
    DbrxExperts' loop with expert e's weights read as slices of (E, out, in) views of the 2-D stacks."""
    weights, top_weights, top_experts = self.router(x)
    mlp = self.experts.mlp
    num_experts, ffn, hidden = self.experts.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size
    bsz, q_len, _ = x.shape
    x = x.view(-1, hidden)
    out = torch.zeros_like(x)
    expert_mask = F.one_hot(top_experts, num_classes=num_experts).permute(2, 1, 0)
    w1 = mlp.w1.view(num_experts, ffn, hidden)
    v1 = mlp.v1.view(num_experts, ffn, hidden)
    w2 = mlp.w2.view(num_experts, ffn, hidden).transpose(1, 2)  # expert e: x @ w2[e] == F.linear(x, w2_t[e])
    for expert_idx in range(num_experts):
        topk_idx, token_idx = torch.where(expert_mask[expert_idx])
        expert_tokens = x[None, token_idx].reshape(-1, hidden)
        gate_proj = mlp.activation_fn(F.linear(expert_tokens, w1[expert_idx]))
        up_proj = F.linear(expert_tokens, v1[expert_idx])
        expert_out = F.linear(gate_proj * up_proj, w2[expert_idx]) * top_weights[token_idx, topk_idx, None]
        out.index_add_(0, token_idx, expert_out)
    return out.reshape(bsz, q_len, hidden), weights


def phimoe_check(block: nn.Module) -> str | None:
    reason = module_list_check(block, "gate")
    if reason is None and block.top_k != 2:
        return f"top_k={block.top_k}: sparsemixer routes to exactly 2 experts"
    return reason


def jamba_check(block: nn.Module) -> str | None:
    return module_list_check(block, "router")


def dbrx_check(block: nn.Module) -> str | None:
    """DbrxFFN: a DbrxRouter-like router and DbrxExperts holding 2-D stacks w1, v1, w2 of (E * ffn, hidden)."""
    experts, router = getattr(block, "experts", None), getattr(block, "router", None)
    mlp = getattr(experts, "mlp", None)
    num_experts = getattr(experts, "moe_num_experts", None)
    if not isinstance(num_experts, int) or mlp is None:
        return "experts is not a DbrxExperts with an integer moe_num_experts and an mlp"
    if not callable(getattr(mlp, "activation_fn", None)):
        return "experts.mlp has no activation_fn"
    ffn, hidden = getattr(mlp, "ffn_hidden_size", None), getattr(mlp, "hidden_size", None)
    for name in ("w1", "v1", "w2"):
        w = getattr(mlp, name, None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (num_experts * ffn, hidden):
            return f"experts.mlp.{name} is not a ({num_experts} * ffn_hidden_size, hidden_size) stack"
    layer = getattr(router, "layer", None)
    if not isinstance(layer, nn.Linear) or layer.out_features != num_experts or \
            getattr(router, "moe_num_experts", None) != num_experts:
        return "router is not a DbrxRouter with an nn.Linear layer of moe_num_experts outputs"
    # The traceable forward runs DbrxExperts' loop and DbrxExpertGLU's MLP itself: a replaced forward or a
    # hook on either would be bypassed.
    for module, name in ((experts, "DbrxExperts"), (mlp, "DbrxExpertGLU")):
        if type(module).forward is not _class_forward(block, name) or "forward" in module.__dict__ \
                or module._forward_hooks or module._forward_pre_hooks:
            return f"{type(module).__name__} runs something other than transformers' {name}.forward"
    return None


def _class_forward(block: nn.Module, name: str):
    """`name`.forward from the module that defines `block`'s class (transformers', or a regenerated copy)."""
    cls = getattr(sys.modules.get(type(block).__module__), name, None)
    return getattr(cls, "forward", None)


FAMILIES = {
    "PhimoeSparseMoeBlock": Family(phimoe_forward, "R'", ("input_jitter_noise", "router_jitter_noise"),
                                   ("w1", "w3", "w2"), check=phimoe_check),
    "JambaSparseMoeBlock": Family(jamba_forward, "R'", ("router",), check=jamba_check),
    "DbrxFFN": Family(dbrx_forward, "R'", ("router",), projections=None, check=dbrx_check),
}

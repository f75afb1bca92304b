"""Form G (GraniteMoe, GraniteMoeShared, GraniteMoeHybrid, JetMoE): 3D expert weights split by token counts.

transformers' block sorts the (token, slot) pairs by expert, reads the count of each expert to the host
(`expert_size.tolist()`), splits the sorted rows by those counts, runs `F.linear(rows_e, weight[e])` per
expert and adds every row back at its token with one `index_add`. The traceable forward computes the same
routing (top-k of the fp32 logits, softmax over the k values, cast to the hidden dtype) and runs the
experts as the range loop the pass groups: expert e gathers its rows with `torch.where(mask[e])` and reads
`input_linear.weight[e]` / `output_linear.weight[e]`, slices of the (E, out, in) parameters that the
pass hands to torch._grouped_mm as they are.

Each token meets each expert at most once, and both forms add a token's rows in ascending expert order, so
the sums are the same. Expert e's rows come in token order in both (the expert mask is laid out (E, tokens,
k)), so even the weight gradients, reductions over those rows, add in the same order: outputs and gradients
match the class forward bit for bit in eager (checked on CPU; transformers sorts with an unstable sort,
which on CPU keeps equal keys in order).

JetMoE's MoE attention (JetMoeMoA) has the same split-by-counts experts but is not a block of this form (it
un-permutes the query projections per slot); it stays as transformers wrote it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graph_moe.families.common import Family, trace_once_requested


def _split_sizes_moe(self, layer_input: torch.Tensor):
    """The MoE output (before JetMoE's bias) and the router logits, as GraniteMoeMoE.forward computes them."""
    bsz, length, emb_size = layer_input.size()
    layer_input = layer_input.reshape(-1, emb_size)
    router = self.router
    router_logits = router.layer(layer_input).float()
    top_k_logits, top_k_indices = router_logits.topk(router.top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(layer_input)

    num_experts = router.num_experts
    expert_inputs, expert_outputs = self.input_linear.weight, self.output_linear.weight  # (E, out, in)
    layer_output = torch.zeros((bsz * length, self.input_size), dtype=layer_input.dtype, device=layer_input.device)
    # (E, tokens, k): torch.where lists expert e's rows token by token, the order transformers' sort gives them.
    expert_mask = F.one_hot(top_k_indices, num_classes=num_experts).permute(2, 0, 1)
    once = trace_once_requested()  # every body is expert 0's reading row e of the two stacks (traced_once.py)
    for expert_idx in range(1 if once else num_experts):
        token, slot = torch.where(expert_mask[expert_idx])
        rows = layer_input[None, token].reshape(-1, emb_size)
        gate, up = F.linear(rows, expert_inputs[expert_idx]).chunk(2, dim=-1)
        hidden_states = self.activation(gate) * up
        rows_out = F.linear(hidden_states, expert_outputs[expert_idx]) * top_k_gates[token, slot, None]
        layer_output.index_add_(0, token, rows_out)
    if once:
        layer_output = torch.ops.graph_moe.every_expert_as_expert_0(layer_output, num_experts,
                                                                    [expert_inputs, expert_outputs])
    return layer_output.view(bsz, length, self.input_size), router_logits


def granite_forward(self, layer_input: torch.Tensor):
    """GraniteMoeMoE / GraniteMoeSharedMoE / GraniteMoeHybridMoE (the shared MLP sits in the decoder layer)."""
    return _split_sizes_moe(self, layer_input)


def jetmoe_forward(self, layer_input: torch.Tensor):
    """JetMoeMoE: the same block plus a bias on the combined output."""
    layer_output, router_logits = _split_sizes_moe(self, layer_input)
    return layer_output + self.bias, router_logits


def split_sizes_check(block: nn.Module) -> str | None:
    """A top-k gating router with a Linear `layer`, and 3-D expert weights (E, 2I, H) and (E, H, I)."""
    router = getattr(block, "router", None)
    num_experts, top_k = getattr(router, "num_experts", None), getattr(router, "top_k", None)
    if not isinstance(num_experts, int) or not isinstance(top_k, int):
        return "router has no integer num_experts and top_k"
    layer = getattr(router, "layer", None)
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if not isinstance(base, nn.Linear) or base.out_features != num_experts:
        return "router.layer is not an nn.Linear with num_experts outputs"
    if not callable(getattr(block, "activation", None)) or not isinstance(getattr(block, "input_size", None), int):
        return "no activation or input_size"
    shapes = []
    for name in ("input_linear", "output_linear"):
        experts = getattr(block, name, None)
        weight = getattr(experts, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] != num_experts:
            return f"{name}.weight is not an (num_experts, out, in) tensor"
        shapes.append(tuple(weight.shape[1:]))
    # The traceable forward does the router's and the experts' work itself: a replaced forward or a hook on
    # them would be bypassed.
    for name in ("router", "input_linear", "output_linear"):
        module = getattr(block, name)
        if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
            return f"{name} has its forward replaced or hooked"
    (gate_up, hidden), (out, inter) = shapes
    if gate_up != 2 * inter or hidden != block.input_size or out != block.input_size:
        return f"expert weights {shapes} are not (2I, H) and (H, I) with H = input_size"
    return None


_ATTRS = ("router", "input_linear", "output_linear", "activation", "input_size")

FAMILIES = {
    "GraniteMoeMoE": Family(granite_forward, "G", _ATTRS, projections=None, check=split_sizes_check),
    "GraniteMoeSharedMoE": Family(granite_forward, "G", _ATTRS, projections=None, check=split_sizes_check),
    "GraniteMoeHybridMoE": Family(granite_forward, "G", _ATTRS, projections=None, check=split_sizes_check),
    "JetMoeMoE": Family(jetmoe_forward, "G", _ATTRS + ("bias",), projections=None, check=split_sizes_check),
}

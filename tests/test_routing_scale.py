"""Each row is scaled by its routing weight before the expert's down projection (passes/early_scale.py): the backward
then keeps no (rows x hidden) expert output to form the routing weights' gradient. Values as in eager."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import graph_moe
from graph_moe.tools.model_zoo import build_model
from helpers import Keep, Recorder, assert_close_bf16, check_model_rewritten
from moe_blocks import RangeMoE

HIDDEN, INTER, TOKENS, TOP_K = 64, 48, 14, 2  # no intermediate width (48, gate+up 96) equals hidden


def _model(lora: bool):
    model = build_model("qwen3_moe", layers=1, experts=4, top_k=TOP_K, hidden=HIDDEN, intermediate=INTER, vocab=64)
    model.model.layers[0].mlp.requires_grad_(False)  # frozen experts; the router, attention, embeddings train
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj",
                                                                                        "down_proj"])
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
        # The block's input then needs a gradient (and so the routing weights), as in every layer after the first
        # of a LoRA model: the adapters below it change it.
        model.enable_input_require_grads()
    return model


def _reaches_grouped_mm(node) -> bool:
    return any(getattr(u.target, "__name__", None) == "_grouped_mm" or _reaches_grouped_mm(u) for u in node.users)


def _wide_saved_rows(model, ids):
    """Shapes of the tensors autograd keeps that hold a hidden-wide row for every (token, slot) pair."""
    weights, saved = {p.data_ptr() for p in model.parameters()}, []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return [tuple(t.shape) for t in saved if t.data_ptr() not in weights and t.dim() == 2 and t.shape[-1] == HIDDEN
            and t.shape[0] >= TOKENS * TOP_K]


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
def test_rows_are_scaled_before_the_down_projection(lora, monkeypatch):
    model = _model(lora)
    unplanned = copy.deepcopy(model)
    # logits and every gradient (the router's comes through the routing weights) equal eager's; with LoRA: base
    # gate+up, fused A factors, gate B, up B, down, down A, down B
    keep = check_model_rewritten(model, blocks=1, grouped_per_loop=7 if lora else 2)
    scaled = [n for g in keep.graphs for n in g.graph.nodes if n.name.startswith("rows_times_routing_weight")]
    assert len(scaled) == 1 and _reaches_grouped_mm(scaled[0])  # the down projection (and its LoRA A) read them
    ids = torch.randint(0, 64, (2, TOKENS // 2))

    # What it saves: told not to plan the early scale, the backward also keeps the experts' (rows x hidden) output.
    # LoRA keeps the gathered input rows either way (LoRA A's weight gradient reads them).
    import graph_moe.passes.emit_grouped as emit

    kept = _wide_saved_rows(model, ids)
    monkeypatch.setattr(emit, "plan_early_scale", lambda loop: None)
    torch._dynamo.reset()
    graph_moe.compile(unplanned, inner=Keep())
    kept_unplanned = _wide_saved_rows(unplanned, ids)
    assert len(kept) == int(lora) and len(kept_unplanned) == len(kept) + 1, (kept, kept_unplanned)


def test_a_down_projection_with_bias_is_scaled_after_it():
    """down(h) = h @ W.T + b is not linear in h: the scale stays where the body put it."""
    torch.manual_seed(3)
    module = RangeMoE(num_experts=4, top_k=2, hidden=16, inter=32, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    reference = copy.deepcopy(module)
    rec = Recorder()
    out = torch.compile(module, backend=rec.backend)(x)
    assert [r.rewritten for r in rec.reports] == [True]
    assert not [n for g in rec.graphs for n in g.graph.nodes if n.name.startswith("rows_times_routing_weight")]
    assert_close_bf16(out, reference(x), "output")


def test_float32_routing_weights_scale_the_rows_in_their_dtype():
    """transformers 5.x Mixtral keeps the routing weights in float32: y * w is float32, cast back to bf16 when added.
    Scaled early, h * w is cast back to h's dtype before the down projection; output and gradients as in eager."""
    torch.manual_seed(4)
    module = RangeMoE(num_experts=4, top_k=2, hidden=16, inter=32, float32_weights=True).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    reference = copy.deepcopy(module)
    rec = Recorder()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = torch.compile(module, backend=rec.backend)(x1), reference(x2)
    assert [r.rewritten for r in rec.reports] == [True]
    assert [n for g in rec.graphs for n in g.graph.nodes if n.name.startswith("rows_times_routing_weight")]
    assert_close_bf16(out, ref, "output")
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert_close_bf16(x1.grad, x2.grad, "input grad")
    assert_close_bf16(module.gate.weight.grad, reference.gate.weight.grad, "router grad")


def test_the_row_routing_weight_is_saved_for_the_backward_not_gathered_again():
    """A frozen block (router included) whose input needs a gradient, under the partitioner Inductor uses: the
    backward reads each row's routing weight (rows x 1) as saved. Left to the partitioner, it gathered the weight
    again through int64 (token, slot) coordinates, which Inductor inlined into every element of the activation's
    gradient kernel (140 us where the forward's activation takes 37, Qwen3-30B-A3B at 4096 tokens, H200)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def inner(gm, example_inputs, **kwargs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep,
                                     partition_fn=min_cut_rematerialization_partition)

    model = build_model("qwen3_moe", layers=1, experts=4, top_k=TOP_K, hidden=HIDDEN, intermediate=INTER, vocab=64,
                        norm_topk_prob=True)  # as Qwen3-30B-A3B
    block = model.model.layers[0].mlp.requires_grad_(False)
    reference = copy.deepcopy(block)
    graph_moe.install(block)
    compiled = torch.compile(lambda h: block(h)[0], backend=graph_moe.make_backend(inner))
    tokens = 64
    x = torch.randn(1, tokens, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    with graph_moe.capture_settings():
        out = compiled(x)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference(x_ref)[0]
    ref.backward(grad)
    assert_close_bf16(out, ref, "output")
    assert_close_bf16(x.grad, x_ref.grad, "input gradient")
    backward = graphs[-1]
    gathers = [n for n in backward.graph.nodes if n.target == torch.ops.aten.index.Tensor and len(n.args[1]) == 2]
    assert not gathers, [n.format_node() for n in gathers]
    saved = [tuple(n.meta["val"].shape) for n in backward.graph.nodes if n.op == "placeholder"]
    assert (tokens * TOP_K, 1) in saved, saved

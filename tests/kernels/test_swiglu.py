"""silu(gate) * up * w as one op (graph_moe/kernels/swiglu.py): its gradient against autograd's on fresh random rows, the op in
the rewritten graph of a SwiGLU family, and a body it must not take (LoRA on gate and up: silu of a sum)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graph_moe.kernels.swiglu import _backward_formula, _swiglu_scaled_backward, swiglu_scaled
from graph_moe.tools.model_zoo import build_model
from helpers import check_model_rewritten


def _inputs(rows, inter, dtype, device="cpu"):
    gu = torch.randn(rows, 2 * inter, dtype=dtype, device=device) * 3  # silu's curved part and both tails
    w = torch.rand(rows, 1, dtype=dtype, device=device)
    return gu, w


def _autograd_reference(gu, w, grad):
    gu, w = gu.detach().requires_grad_(), w.detach().requires_grad_()
    gate, up = gu.chunk(2, dim=-1)
    (F.silu(gate) * up * w).backward(grad)
    return gu.grad, w.grad


def test_gradient_equals_autograd_in_float32():
    gu, w = _inputs(37, 24, torch.float32)
    grad = torch.randn(37, 24)
    torch.library.opcheck(swiglu_scaled, (gu.requires_grad_(), w.requires_grad_()))
    out = swiglu_scaled(gu, w)
    gate, up = gu.detach().chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up * w.detach())
    d_gu, d_w = torch.autograd.grad(out, (gu, w), grad)
    ref_gu, ref_w = _autograd_reference(gu, w, grad)
    torch.testing.assert_close(d_gu, ref_gu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_w, ref_w, rtol=1e-5, atol=1e-4)


def test_gradient_in_bfloat16_is_autograds_within_rounding():
    gu, w = _inputs(64, 40, torch.bfloat16)
    grad = torch.randn(64, 40, dtype=torch.bfloat16)
    d_gu, d_w = _backward_formula(gu, w, grad)
    assert d_gu.dtype == d_w.dtype == torch.bfloat16
    ref_gu, ref_w = _autograd_reference(gu.float(), w.float(), grad.float())
    torch.testing.assert_close(d_gu.float(), ref_gu, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(d_w.float(), ref_w, rtol=1.6e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton backward runs on CUDA")
def test_triton_backward_equals_the_formula_on_cuda():
    for rows, inter in ((1, 8), (1000, 768), (333, 1408)):
        gu, w = _inputs(rows, inter, torch.bfloat16, "cuda")
        grad = torch.randn(rows, inter, dtype=torch.bfloat16, device="cuda")
        d_gu, d_w = _swiglu_scaled_backward(gu, w, grad)
        ref_gu, ref_w = _backward_formula(gu, w, grad)
        torch.testing.assert_close(d_gu, ref_gu, rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(d_w, ref_w, rtol=1.6e-2, atol=5e-2)


def _swiglu_ops(keep):
    return sum(1 for g in keep.graphs for n in g.graph.nodes if n.target is torch.ops.graph_moe.swiglu_scaled)


def test_rewritten_swiglu_block_uses_the_op_and_matches_eager():
    """Frozen Qwen3-MoE experts: gate+up from the layout's one GEMM, silu, the early routing scale: one op per
    layer; logits and every gradient (router, attention, embeddings) as in eager."""
    model = build_model("qwen3_moe", layers=2, experts=4, top_k=2, hidden=64, intermediate=48, vocab=64)
    for layer in model.model.layers:
        layer.mlp.experts.requires_grad_(False)
    keep = check_model_rewritten(model, blocks=2)
    assert _swiglu_ops(keep) >= 1


def test_lora_on_gate_and_up_keeps_the_traced_activation():
    """With LoRA on gate and up, silu reads gate + its adapter's output, not a half of the GEMM: left as traced."""
    from peft import LoraConfig, get_peft_model

    model = build_model("qwen3_moe", layers=1, experts=4, top_k=2, hidden=64, intermediate=48, vocab=64)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj"])
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    keep = check_model_rewritten(model, blocks=1, grouped_per_loop=5)
    assert _swiglu_ops(keep) == 0


def _rows_and_weight(rows, weight_rows):
    """An FX graph of silu(gate) * up (left unused, as emit_grouped has just emitted it) with each node's value."""
    def body(gu, w):
        gate, up = gu.chunk(2, dim=-1)
        F.silu(gate) * up
        return w

    gm = torch.fx.symbolic_trace(body)

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            n.meta["example_value"] = super().run_node(n)
            return n.meta["example_value"]

    Record(gm).run(torch.randn(rows, 16), torch.rand(weight_rows, 1))
    nodes = {n.name: n for n in gm.graph.nodes}
    return nodes["mul"], nodes["w"], nodes["gu"]


def test_the_op_takes_one_weight_per_row_only():
    """The Triton backward reads w[row]: a weight broadcast over the rows (1, 1) keeps the traced ops."""
    from graph_moe.passes.match_swiglu import swiglu_input

    h, w, gu = _rows_and_weight(6, 6)
    assert swiglu_input(h, w)[0] is gu
    h, w, _ = _rows_and_weight(6, 1)
    assert swiglu_input(h, w) is None

"""3D-weight experts (gpt-oss, Qwen3-VL-MoE, Llama4 in transformers 4.57): traceable forwards and the pass's
`x @ stack[e]` (+ `bias[e]`) forms.

Models are real transformers classes built from tiny configs; their expert weights are re-drawn at unit scale
(and gpt-oss's expert biases, zero at init, drawn nonzero) so that the experts move the logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.families import unsupported_reason
from graph_moe.families.stacked import FAMILIES, stacked_expert_loop
from helpers import Recorder, assert_close_bf16, check_model_rewritten, grads

TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=128)


def _unit_scale_experts(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                fresh = torch.randn(p.shape, generator=generator)
                p.copy_(fresh / math.sqrt(p.shape[1]) if p.dim() == 3 else fresh * 0.5)
    return model


def build(family, *, top_k=2, experts=4, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    if family == "gpt_oss":
        config = tf.GptOssConfig(**TEXT, intermediate_size=32, num_local_experts=experts, num_experts_per_tok=top_k,
                                 sliding_window=16, layer_types=["sliding_attention", "full_attention"])
        model = tf.GptOssForCausalLM(config)
    elif family == "qwen3_vl_moe":
        # transformers 4.57 has no text-only Qwen3-VL-MoE LM class: the VL model with a one-block vision tower,
        # fed text only.
        text = dict(TEXT, intermediate_size=32, moe_intermediate_size=32, num_experts=experts,
                    num_experts_per_tok=top_k, decoder_sparse_step=1,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                      deepstack_visual_indexes=[])
        model = tf.Qwen3VLMoeForConditionalGeneration(tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision))
    elif family == "llama4":
        config = tf.Llama4TextConfig(**TEXT, intermediate_size=32, intermediate_size_mlp=32,
                                     num_local_experts=experts, num_experts_per_tok=top_k, interleave_moe_layer_step=1)
        model = tf.Llama4ForCausalLM(config)
    else:
        raise ValueError(family)
    return _unit_scale_experts(model).to(dtype)


FAMILY_NAMES = ["gpt_oss", "qwen3_vl_moe", "llama4"]


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in FAMILIES]


# ------------------------------------------------------------------------------------------- traceable forwards


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family,top_k", [("gpt_oss", 2), ("qwen3_vl_moe", 2), ("llama4", 1), ("llama4", 3)])
def test_traceable_forward_equals_transformers(family, top_k, training):
    """Bit for bit in eager, both outputs. Qwen3-VL-MoE in eval and Llama4 always run transformers' dense path
    (every expert on every token); gpt-oss on CPU always loops (its dense path: the next test)."""
    model = build(family, top_k=top_k).train(training)
    torch.manual_seed(3)
    for block in moe_blocks(model):
        assert unsupported_reason(block) is None
        x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
        expected = block(x)
        got = FAMILIES[type(block).__name__].forward(block, x)
        assert len(got) == len(expected) == 2
        for a, b in zip(got, expected):
            assert a.shape == b.shape and torch.equal(a, b)


def _gpt_oss_dense_path(experts, hidden_states, routing_weights):
    """GptOssExperts.forward's inference branch (transformers 4.57.6, taken on CUDA outside training), verbatim:
    every expert on every token, times the dense routing scores."""
    batch_size = hidden_states.shape[0]
    hidden_states = hidden_states.reshape(-1, experts.hidden_size)
    num_experts = routing_weights.shape[1]
    hidden_states = hidden_states.repeat(num_experts, 1)
    hidden_states = hidden_states.view(num_experts, -1, experts.hidden_size)
    gate_up = torch.bmm(hidden_states, experts.gate_up_proj) + experts.gate_up_proj_bias[..., None, :]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=experts.limit)
    up = up.clamp(min=-experts.limit, max=experts.limit)
    glu = gate * torch.sigmoid(gate * experts.alpha)
    next_states = torch.bmm(((up + 1) * glu), experts.down_proj)
    next_states = next_states + experts.down_proj_bias[..., None, :]
    next_states = next_states.view(num_experts, batch_size, -1, experts.hidden_size)
    next_states = next_states * routing_weights.transpose(0, 1).view(num_experts, batch_size, -1)[..., None]
    return next_states.sum(dim=0)


def test_gpt_oss_traceable_forward_equals_the_dense_path():
    model = build("gpt_oss").eval()
    torch.manual_seed(4)
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    for block in moe_blocks(model):
        router_scores, _ = block.router(x)
        dense = _gpt_oss_dense_path(block.experts, x, router_scores)
        got, scores = FAMILIES["GptOssMLP"].forward(block, x)
        assert torch.equal(scores, router_scores)
        assert dense.abs().max() > 0.5  # the experts do move the output
        assert_close_bf16(got, dense, "gpt-oss dense path")


# ------------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_rewritten_and_equal(family):
    """Every MoE layer rewritten (2 grouped GEMMs each, no index_add_ left); logits and every gradient, the 3D
    expert weights and biases included, equal the untouched eager model."""
    model = build(family)
    keep = check_model_rewritten(model, blocks=2)
    assert keep.count("stack_weights") == 0  # the 3D parameters go to _grouped_mm as they are
    for name, param in model.named_parameters():
        if ".experts." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    report = model._graph_moe_install_report
    assert all(b.weights == "stacked by the model" for b in report.blocks if b.status == "installed")


def test_structure_checks_refuse_unexpected_layouts():
    model = build("gpt_oss")
    first, second = moe_blocks(model)
    first.experts.down_proj_bias = nn.Parameter(torch.zeros(4, 16, dtype=torch.bfloat16))
    second.experts.register_forward_hook(lambda *args: None)
    report = graph_moe.install(model)
    assert report.num_installed == 0
    assert "down_proj_bias" in unsupported_reason(first)
    assert "hooks" in unsupported_reason(second)

    llama = build("llama4")
    block = moe_blocks(llama)[0]
    block.experts.gate_up_proj = nn.Parameter(block.experts.gate_up_proj.detach()[:, :, :48])
    assert "are not" in unsupported_reason(block)
    assert graph_moe.install(llama).num_installed == 1


# ------------------------------------------------------------------------------------------- pass-level forms


class StackedMoE(nn.Module):
    """A range-loop block over stacked 3D expert weights, in the forms the pass groups:
    form "matmul" (x @ w[e], w (E, in, out)), "mm" (torch.mm), or "linear" (F.linear(x, w[e], b[e]), w (E, out, in));
    biases (E, out) added after the product (or inside F.linear); gate and up fused in one stack or apart;
    an optional per-expert scale (E, I) on the hidden activation."""

    def __init__(self, hidden=16, inter=32, num_experts=4, top_k=2, form="matmul", bias=True, fused=True,
                 scale=False):
        super().__init__()
        self.form, self.top_k, self.num_experts, self.fused = form, top_k, num_experts, fused
        self.gate = nn.Linear(hidden, num_experts, bias=False)

        def weight(n_in, n_out):
            shape = (num_experts, n_out, n_in) if form == "linear" else (num_experts, n_in, n_out)
            return nn.Parameter(torch.randn(shape) / math.sqrt(n_in))

        def vector(n):
            return nn.Parameter(torch.randn(num_experts, n) * 0.5) if bias else None

        if fused:
            self.gate_up, self.gate_up_bias = weight(hidden, 2 * inter), vector(2 * inter)
        else:
            self.w_gate, self.b_gate = weight(hidden, inter), vector(inter)
            self.w_up, self.b_up = weight(hidden, inter), vector(inter)
        self.down, self.down_bias = weight(inter, hidden), vector(hidden)
        self.scale = nn.Parameter(torch.rand(num_experts, inter) + 0.5) if scale else None

    def project(self, x, w, b, e):
        if self.form == "linear":
            return F.linear(x, w[e], None if b is None else b[e])
        y = x @ w[e] if self.form == "matmul" else torch.mm(x, w[e])
        return y if b is None else y + b[e]

    def expert(self, e, x):
        if self.fused:
            gate, up = self.project(x, self.gate_up, self.gate_up_bias, e).chunk(2, dim=-1)
        else:
            gate, up = self.project(x, self.w_gate, self.b_gate, e), self.project(x, self.w_up, self.b_up, e)
        hidden = F.silu(gate) * up
        if self.scale is not None:
            hidden = hidden * self.scale[e]
        return self.project(hidden, self.down, self.down_bias, e)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        routing_weights = F.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights.to(hidden_states.dtype)
        stacks = [p for name, p in self.named_parameters() if not name.startswith("gate.")]  # what expert(e) reads
        out = stacked_expert_loop(hidden_states, routing_weights, selected, self.num_experts, self.expert, stacks)
        return out.reshape(shape)


def _run(module, x, recorder):
    """Eager and compiled forward and backward from the same seed gradient."""
    x_ref = x.clone().requires_grad_()
    ref = module(x_ref)
    seed = torch.randn_like(ref)
    ref.backward(seed)
    ref_grads = grads(module, x_ref)
    module.zero_grad()
    x_c = x.clone().requires_grad_()
    out = torch.compile(module, backend=recorder.backend)(x_c)
    out.backward(seed)
    return ref, out, ref_grads, grads(module, x_c)


STACKED_VARIANTS = [
    dict(form="matmul", bias=True, fused=True),
    dict(form="mm", bias=False, fused=True),
    dict(form="matmul", bias=True, fused=False, scale=True),
    dict(form="linear", bias=True, fused=True),
    dict(form="linear", bias=True, fused=False, top_k=1),
]


@pytest.mark.parametrize("cfg", STACKED_VARIANTS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_stacked_forms_rewritten_and_equal(cfg):
    torch.manual_seed(len(str(cfg)))
    module = StackedMoE(**cfg).to(torch.bfloat16)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, torch.randn(2, 5, 16, dtype=torch.bfloat16), rec)
    (report,) = rec.reports
    assert report.rewritten, report.reason
    # Gate and up from two stacks stay two grouped GEMMs: fusing them would copy both stacks every forward.
    assert rec.count("_grouped_mm") == (2 if cfg["fused"] else 3)
    assert rec.count("index_add_", "index_add") == 0
    assert rec.count("stack_weights") == 0  # weights, biases and scales are read from their stacks, not copied
    assert_close_bf16(out, ref, "output")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads)):
        assert a is not None and b is not None
        assert_close_bf16(a, b, f"grad {i}")
    assert counters["graph_moe"]["loops_rewritten"] == 1


class _ParameterLists(StackedMoE):
    """Each expert's (in, out) weights and biases as parameters of their own (nn.ParameterList): x @ w[e] reads a
    per-expert parameter, not a slice, so the pass stacks them, and gate and up share one grouped GEMM."""

    def __init__(self, **kw):
        super().__init__(**kw)
        for name, stack in list(self.named_parameters()):
            if name != "gate.weight" and "." not in name:
                delattr(self, name)
                setattr(self, name, nn.ParameterList(nn.Parameter(t.detach().clone()) for t in stack))


@pytest.mark.parametrize("fuse", [True, False])
def test_per_expert_matmul_weights_fused_or_not(fuse):
    torch.manual_seed(0)
    module = _ParameterLists(form="matmul", fused=False).to(torch.bfloat16)
    rec = Recorder(fuse_projections=fuse)
    ref, out, ref_grads, out_grads = _run(module, torch.randn(2, 3, 16, dtype=torch.bfloat16), rec)
    (report,) = rec.reports
    assert report.rewritten, report.reason
    assert rec.count("_grouped_mm") == (2 if fuse else 3) and rec.count("index_add_") == 0
    assert len(report.projections) == (2 if fuse else 3)
    assert_close_bf16(out, ref, "output")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads)):
        assert_close_bf16(a, b, f"grad {i}")


def test_stacked_matmul_float32_uses_the_fallback_op():
    torch.manual_seed(5)
    module = StackedMoE(form="matmul", bias=True, fused=False)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, torch.randn(2, 5, 16), rec)
    (report,) = rec.reports
    assert report.rewritten and "graph_moe::grouped_mm" in str(report)
    assert rec.count("_grouped_mm") == 0 and rec.count("grouped_mm") == 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _Misaligned(StackedMoE):
    """A per-expert (1, I) scale: broadcasting it needs a row dimension the pass does not invent."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.scale = nn.Parameter(self.scale.detach()[:, None])  # (E, 1, I)

    def expert(self, e, x):
        gate, up = (x @ self.gate_up[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up * self.scale[e]) @ self.down[e]


class _BatchedSlice(StackedMoE):
    """x @ w[e:e+1]: a 3-D slice (a batched matmul) is not a per-expert 2-D weight."""

    def expert(self, e, x):
        gate, up = (x @ self.gate_up[e]).chunk(2, dim=-1)
        return ((F.silu(gate) * up) @ self.down[e:e + 1])[0]


@pytest.mark.parametrize("module_cls,words", [(_Misaligned, ("per-expert scale[e]", "does not line up")),
                                              (_BatchedSlice, ("expert",))])
def test_unprovable_stacked_forms_are_left_alone(module_cls, words):
    torch.manual_seed(0)
    module = module_cls(bias=False, scale=True).to(torch.bfloat16)
    rec = Recorder()
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    assert_close_bf16(torch.compile(module, backend=rec.backend)(x), module(x))
    (report,) = rec.reports
    assert not report.rewritten and all(w in report.reason for w in words), report.reason
    assert rec.count("index_add_") == 4 and rec.count("_grouped_mm") == 0

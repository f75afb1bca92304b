"""Form G families (GraniteMoe, GraniteMoeShared, GraniteMoeHybrid, JetMoE; transformers 4.57): graph_moe
rewrites every MoE MLP layer, and each traceable forward equals its class forward in eager."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import graph_moe
from graph_moe.families import split_sizes, unsupported_reason
from helpers import check_model_rewritten

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)

CONFIGS = {
    "granitemoe": lambda: tf.GraniteMoeConfig(**SIZES),
    "granitemoeshared": lambda: tf.GraniteMoeSharedConfig(**SIZES, shared_intermediate_size=32),
    # One mamba layer and one attention layer, both with MoE MLPs: two layer kinds, two compiled graphs.
    "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
        **SIZES, shared_intermediate_size=32, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16),
    "jetmoe": lambda: tf.JetMoeConfig(**{k: v for k, v in SIZES.items() if k != "num_attention_heads"},
                                      kv_channels=8),
}
LOOPS = {"granitemoehybrid": 2}  # regional compilation: one graph per layer kind


def build(name, dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config).to(dtype)


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in split_sizes.FAMILIES]


@pytest.mark.parametrize("name", CONFIGS)
def test_model_rewritten_and_equal(name):
    """Every MoE MLP installed as form G and rewritten (input_linear, output_linear: two grouped GEMMs);
    logits and gradients equal eager. JetMoE's MoE attention keeps its own split-by-counts experts."""
    model = build(name)
    check_model_rewritten(model, blocks=2, loops=LOOPS.get(name, 1))
    report = model._graph_moe_install_report
    assert {b.form for b in report.blocks} == {"G"} and {b.weights for b in report.blocks} == {"stacked by the model"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", CONFIGS)
def test_traceable_forward_equals_class_forward(name, dtype):
    """Outputs, router logits and gradients (input and every parameter) of the class forward. Expert e's rows
    come in the order transformers' sort gives them, so even the weight-gradient reductions add in the same
    order: bit-identical in bf16. In fp32 the CPU GEMM may round a row differently when its input is a split
    view at an odd offset rather than a fresh gathered tensor: equal within one rounding there."""
    model = build(name, dtype)
    blocks = moe_blocks(model)
    assert len(blocks) == 2
    same = torch.equal if dtype == torch.bfloat16 else _close
    for i, block in enumerate(blocks):
        assert unsupported_reason(block) is None
        x = torch.randn(2, 7, 32, dtype=dtype, generator=torch.Generator().manual_seed(i))
        forward = split_sizes.FAMILIES[type(block).__name__].forward
        expected = _run(type(block).forward, block, x)
        got = _run(forward, block, x)
        for a, b, what in zip(got, expected, ("output", "router logits", "input grad")):
            assert same(a, b), what
        for param_name, p in block.named_parameters():
            assert same(got[-1][p], expected[-1][p]), param_name


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    return True


def _run(forward, block, x):
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out, logits = forward(block, x)
    torch.autograd.backward([out, logits], [torch.ones_like(out), torch.full_like(logits, 0.5)])
    return out.detach(), logits.detach(), x.grad, {p: p.grad for p in block.parameters()}


def test_structure_checks_refuse_other_layouts():
    model = build("granitemoe")
    first, second = moe_blocks(model)
    first.output_linear.register_forward_pre_hook(lambda *a: None)
    assert "output_linear" in unsupported_reason(first)
    second.input_linear.weight = torch.nn.Parameter(torch.zeros(4, 32, 32, dtype=torch.bfloat16))
    assert "(2I, H) and (H, I)" in unsupported_reason(second)
    assert graph_moe.install(model).num_installed == 0

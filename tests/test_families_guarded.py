"""Form R′ families (PhiMoE, Jamba, DBRX; transformers 4.57): graph_moe rewrites every MoE layer, and each
traceable forward equals its class forward in eager."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.families import empty_guard, unsupported_reason
from helpers import (Keep, Recorder, assert_close_bf16, assert_grads_close, check_model_rewritten,
                     loss_and_grads)

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "phimoe": lambda **kw: tf.PhimoeConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2, **kw),
    # Attention layers only: a mamba layer (slow path, no CUDA kernels) fails under plain torch.compile on
    # torch 2.13, graph_moe or not (its compiled backward: "view size is not compatible with input tensor's
    # size and stride"). graph_moe.compile compiles every decoder layer, so a Jamba with mamba layers needs its
    # MoE blocks compiled alone (block.compile(backend=graph_moe.backend)).
    "jamba": lambda **kw: tf.JambaConfig(**{**SIZES, **dict(
        num_experts=4, num_experts_per_tok=2, attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1,
        expert_layer_offset=0, use_mamba_kernels=False), **kw}),
    # clip_qkv set: with the default None, DbrxAttention calls clamp(min=None, max=None), which raises.
    "dbrx": lambda **kw: tf.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=64,
                                       attn_config={"kv_n_heads": 2, "clip_qkv": 8.0},
                                       ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2,
                                                   **kw.pop("ffn", {})}, **kw),
}


def build(name, dtype=torch.bfloat16, **config_kw):
    torch.manual_seed(0)
    config = CONFIGS[name](**config_kw)
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config).to(dtype)


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in empty_guard.FAMILIES]


@pytest.mark.parametrize("name", CONFIGS)
def test_model_rewritten_and_equal(name):
    """Every MoE layer installed as form R′ and rewritten; logits and gradients equal eager (PhiMoE in eval
    mode: in training its router samples)."""
    model = build(name)
    # DBRX's gate and up are slices of two stacks, each handed to its own grouped GEMM (fusing would copy both
    # stacks every forward): three per loop.
    check_model_rewritten(model, blocks=2, eval_mode=name == "phimoe", grouped_per_loop=3 if name == "dbrx" else 2)
    assert {b.form for b in model._graph_moe_install_report.blocks} == {"R'"}


def test_jamba_with_mamba_layers_blocks_compiled_alone():
    """A Jamba as released mixes mamba and attention layers: its MoE blocks, compiled alone with the backend,
    are rewritten (one graph for both) and the model equals eager."""
    model = build("jamba", attn_layer_period=2, attn_layer_offset=1)
    assert [type(layer).__name__ for layer in model.model.layers] == ["JambaMambaDecoderLayer",
                                                                      "JambaAttentionDecoderLayer"]
    reference = copy.deepcopy(model)
    assert graph_moe.install(model).num_installed == 2
    rec = Recorder()
    for block in moe_blocks(model):
        block.compile(backend=rec.backend)
    ids = torch.randint(0, 64, (2, 7))
    with graph_moe.capture_settings():
        logits, grads = loss_and_grads(model, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] == 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert rec.count("_grouped_mm") == 2 and rec.count("index_add_") == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    assert_grads_close(grads, ref_grads)


def test_phimoe_frozen_experts_use_the_layout():
    model = build("phimoe")
    for block in moe_blocks(model):
        block.experts.requires_grad_(False)
    check_model_rewritten(model, blocks=2, eval_mode=True)
    assert {b.weights for b in model._graph_moe_install_report.blocks} == {"grouped layout"}


def test_phimoe_training_routing_compiled_equals_eager():
    """In training sparsemixer samples experts (Gumbel) and its multipliers (Heun's mask), with a custom
    backward; input jitter scales the hidden states in place. Under aot_eager the random ops draw from the
    same generator in the same order, so with one seed compiled and eager agree."""
    model = build("phimoe", input_jitter_noise=0.01).train()
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 7))
    torch.manual_seed(5)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.manual_seed(5)
    logits, grads = loss_and_grads(model, ids)
    assert counters["graph_moe"]["loops_rewritten"] == 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert keep.count("_grouped_mm") == 2 and keep.count("index_add_") == 0
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    assert_grads_close(grads, ref_grads)
    with torch.no_grad():  # training drew random numbers (jitter, sampled routing): not the eval-mode logits
        assert not torch.equal(reference.eval()(input_ids=ids, use_cache=False).logits, ref_logits)


def _run(forward, block, x, seed):
    """Output, router output and every gradient of one forward/backward, from a fixed RNG state."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out, router = forward(block, x.clone())  # jitter scales the input in place, as in transformers
    torch.autograd.backward([out, router], [torch.ones_like(out), torch.full_like(router, 0.5)])
    # An expert no token chose: the class loop skips it (grad None), the traceable loop runs it on no rows (zeros).
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in block.named_parameters()}
    return out.detach(), router.detach(), grads, x.grad


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", CONFIGS)
def test_traceable_forward_equals_class_forward(name, dtype, training):
    """Bit-identical outputs, router outputs and gradients (jitter and sparsemixer sampling on in training)."""
    jitter = {"phimoe": dict(input_jitter_noise=0.05), "jamba": {}, "dbrx": dict(ffn={"moe_jitter_eps": 0.05})}
    model = build(name, dtype, **(jitter[name] if training else {})).train(training)
    blocks = moe_blocks(model)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        assert unsupported_reason(block) is None
        x = torch.randn(2, 7, 32, dtype=dtype, generator=torch.Generator().manual_seed(i))
        family = empty_guard.FAMILIES[type(block).__name__]
        expected = _run(type(block).forward, block, x, seed=i)
        got = _run(family.forward, block, x, seed=i)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert got[2].keys() == expected[2].keys()
        for n in expected[2]:
            assert torch.equal(got[2][n], expected[2][n]), n
        assert torch.equal(got[3], expected[3])


@pytest.mark.parametrize("name", ["phimoe", "jamba"])
def test_laid_out_experts_equal_class_forward(name):
    """Frozen experts laid out once (gate and up read from one (E, 2I, H) stack): the class forward's outputs."""
    model = build(name).eval()
    block = moe_blocks(model)[0]
    block.experts.requires_grad_(False)
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    expected = type(block).forward(block, x.clone())
    report = graph_moe.install(block)
    assert report.blocks[0].weights == "grouped layout"
    got = block(x.clone())
    # Bit-identical on CPU: each output element is the same dot product whether gate and up share a matmul.
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_structure_checks_refuse_other_layouts():
    model = build("dbrx")
    ffn = moe_blocks(model)[0]
    ffn.experts.register_forward_hook(lambda *a: None)
    assert "DbrxExperts.forward" in unsupported_reason(ffn)
    phimoe = moe_blocks(build("phimoe"))[0]
    phimoe.top_k = 3
    assert "sparsemixer" in unsupported_reason(phimoe)
    jamba = moe_blocks(build("jamba"))[0]
    jamba.router = torch.nn.Linear(32, 5, bias=False)
    assert "router" in unsupported_reason(jamba)
    report = graph_moe.install(model)
    assert report.num_installed == 1  # the hooked block is left alone, the other installed

"""Forms D and S (DeepSeek-V3, Dots1, GLM4-MoE, GLM4V-MoE, LongCat-Flash, DeepSeek-V2; transformers 4.57):
the traceable forwards equal the class forwards, and graph_moe rewrites every MoE layer with logits and gradients
equal to eager."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.families import FAMILIES, unsupported_reason
from helpers import Keep, assert_close_bf16, assert_grads_close, check_model_rewritten, loss_and_grads

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, max_position_embeddings=64,
              initializer_range=0.2)  # large enough that routing varies across tokens
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
ZERO_EXPERTS = 2  # LongCat-Flash's identity experts, after the MLP experts


def _moe(experts, top_k, first_dense=0, **extra):
    """DeepSeek-V3-style MoE settings; n_group/topk_group make the top-k group-limited (2 experts a group);
    the first `first_dense` layers have a dense MLP."""
    return {**dict(moe_intermediate_size=32, n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1,
                   first_k_dense_replace=first_dense, n_group=experts // 2, topk_group=max(1, experts // 4)), **extra}


def make_config(family, *, layers=2, experts=4, top_k=2, first_dense=0):
    heads = dict(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**COMMON, **heads, **MLA, **_moe(experts, top_k, first_dense),
                                   routed_scaling_factor=2.5,
                                   norm_topk_prob=True)
    if family == "dots1":
        return tf.Dots1Config(**COMMON, **heads, **_moe(experts, top_k), routed_scaling_factor=1.5, norm_topk_prob=True)
    if family == "glm4_moe":
        return tf.Glm4MoeConfig(**COMMON, **heads, **_moe(experts, top_k), routed_scaling_factor=1.5,
                                norm_topk_prob=False)
    if family == "glm4v_moe":  # the MoE is in the text model; a one-block vision tower that text-only inputs skip
        text = dict(**COMMON, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                    **_moe(experts, top_k), routed_scaling_factor=1.5,
                    rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]})
        vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=2,
                      image_size=4, temporal_patch_size=1, spatial_merge_size=1)
        special = range(VOCAB - 6, VOCAB)  # image/video tokens, never drawn by the tests
        return tf.Glm4vMoeConfig(text_config=text, vision_config=vision, **dict(zip(
            ("video_start_token_id", "video_end_token_id", "image_token_id", "video_token_id",
             "image_start_token_id", "image_end_token_id"), special)))
    if family == "longcat_flash":
        return tf.LongcatFlashConfig(vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_attention_heads=4,
                                     ffn_hidden_size=32, expert_ffn_hidden_size=32, n_routed_experts=experts,
                                     zero_expert_num=ZERO_EXPERTS, moe_topk=top_k, head_dim=8, **MLA,
                                     routed_scaling_factor=2.0, initializer_range=0.2, max_position_embeddings=64)
    if family == "deepseek_v2":
        return tf.DeepseekV2Config(**COMMON, **heads, **MLA, **_moe(experts, top_k, n_group=None, topk_group=None),
                                   routed_scaling_factor=1.5)
    if family == "deepseek_v2_grouped_bias":  # group-limited greedy routing, experts with biases
        return tf.DeepseekV2Config(**COMMON, **heads, **MLA, **_moe(experts, top_k), routed_scaling_factor=1.5,
                                   topk_method="group_limited_greedy", mlp_bias=True)
    raise ValueError(family)


FAMILY_CLASSES = {"deepseek_v3": "DeepseekV3MoE", "dots1": "Dots1MoE", "glm4_moe": "Glm4MoeMoE",
                  "glm4v_moe": "Glm4vMoeTextMoE", "longcat_flash": "LongcatFlashMoE", "deepseek_v2": "DeepseekV2MoE",
                  "deepseek_v2_grouped_bias": "DeepseekV2MoE"}


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in FAMILIES and FAMILIES[type(m).__name__].form in "DS"]


def router(block):
    return block.router if hasattr(block, "router") else block.gate


def build(family, *, dtype=torch.bfloat16, seed=0, **sizes):
    """A tiny model of `family`, random weights; random correction biases (zeros by default) so that they steer
    the top-k; LongCat's correction bias favours its zero experts, so that tokens do reach them. LongCat's scores
    are a softmax over 6 experts (about 1/6 each), so its bias is smaller, else it would route every token alike."""
    torch.manual_seed(seed)
    config = make_config(family, **sizes)
    model = (tf.Glm4vMoeForConditionalGeneration(config) if family == "glm4v_moe"
             else tf.AutoModelForCausalLM.from_config(config)).to(dtype)
    with torch.no_grad():
        for block in moe_blocks(model):
            bias = getattr(router(block), "e_score_correction_bias", None)
            if bias is not None:
                if family == "longcat_flash":
                    bias.normal_(0.0, 0.02)
                    bias[-ZERO_EXPERTS:] += 0.05
                else:
                    bias.normal_(0.0, 0.3)
    return model


def zero_expert_slots(model, ids) -> int:
    """How many (token, slot) pairs of LongCat's MoE layers go to a zero (identity) expert, in eager."""
    picked = []
    hooks = [router(b).register_forward_hook(lambda m, args, out: picked.append(out[0] >= m.n_routed_experts - ZERO_EXPERTS))
             for b in moe_blocks(model)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return int(sum(p.sum() for p in picked))


def forward_kwargs(family, ids):
    # GLM4V's text model fails without a mask in 4.57.6 (3-D mrope position ids meet create_causal_mask).
    return {"attention_mask": torch.ones_like(ids)} if family == "glm4v_moe" else {}


# ---------------------------------------------------------------------------------------------------------------
# The traceable forward computes what the class forward computes (eager, bf16).


@pytest.mark.parametrize("family", list(FAMILY_CLASSES))
@pytest.mark.parametrize("experts,top_k", [(4, 2), (8, 3)])
def test_traceable_forward_equals_class_forward(family, experts, top_k):
    model = build(family, layers=1, experts=experts, top_k=top_k)
    (block,) = moe_blocks(model)
    assert type(block).__name__ == FAMILY_CLASSES[family] and unsupported_reason(block) is None
    traceable = types.MethodType(FAMILIES[type(block).__name__].forward, block)
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    x_copy = x.detach().clone().requires_grad_()
    ref = block(x)
    ref.float().square().sum().backward()
    ref_grads = _grads_or_zeros(block, x)
    block.zero_grad()
    out = traceable(x_copy)
    out.float().square().sum().backward()
    out_grads = _grads_or_zeros(block, x_copy)
    if family == "longcat_flash":  # the zero experts are exercised
        assert (router(block)(x)[0] >= router(block).n_routed_experts - ZERO_EXPERTS).any()
    form_d = FAMILIES[type(block).__name__].form == "D"
    if top_k == 2 and family != "longcat_flash":
        # Same fp32 terms added in an order that cannot matter (two slots): bit-identical.
        assert torch.equal(out, ref)
    else:  # more than two fp32 terms, or LongCat's zero experts summed apart: equal up to fp32 rounding
        assert_close_bf16(out, ref, "output")
    if form_d and family != "longcat_flash":
        # Each expert sees its rows in the class's order (torch.where over the same (T, K) mask): same gradients.
        assert all(torch.equal(a, b) for a, b in zip(out_grads, ref_grads))
    else:  # form S orders an expert's rows by argsort: weight gradients sum the rows in another order
        for a, b in zip(out_grads, ref_grads):
            assert_close_bf16(a, b, "gradient")


def _grads_or_zeros(module, x):
    """Every parameter's gradient and x's; an expert the class skipped (no tokens) has None, the loop zeros."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()] + [x.grad]


# ---------------------------------------------------------------------------------------------------------------
# graph_moe.compile rewrites every MoE layer; logits and every gradient equal the untouched eager model.


@pytest.mark.parametrize("family", ["deepseek_v3", "dots1", "glm4_moe", "longcat_flash", "deepseek_v2_grouped_bias"])
def test_model_rewritten_and_equal(family):
    model = build(family)
    if family == "longcat_flash":
        with torch.random.fork_rng():  # the tokens check_model_rewritten draws next reach the zero experts
            assert zero_expert_slots(model, torch.randint(0, VOCAB, (2, 7))) > 0
    keep = check_model_rewritten(model, blocks=2)
    if family == "deepseek_v2_grouped_bias":  # the experts' biases are added per row after the grouped GEMMs
        assert sum(n.name.startswith("row_bias") for g in keep.graphs for n in g.graph.nodes) == 2
    # the loop adds float32 products into a float32 sum: the routing weight stays after the down projection
    # (passes/early_scale.py), where bf16 rounding of h * w would cost precision
    assert not any(n.name.startswith("rows_times_routing_weight") for g in keep.graphs for n in g.graph.nodes)


@pytest.mark.parametrize("experts", ["frozen", "stacked-trained", "lora"])
def test_longcat_experts_get_the_grouped_layout(experts):
    """LongCat-Flash's identity zero experts come after its MLP experts: the layout and the stacked LoRA adapters
    cover the MLP experts, so frozen experts are read from one grouped layout, trained ones from stacked parameters
    and PEFT's adapters from stacks (no weight stack per forward), expert 0's body traced alone; logits and gradients
    equal eager, with tokens routed to zero experts, and the adapters keep PEFT's state_dict keys."""
    from peft import LoraConfig, get_peft_model

    model = build("longcat_flash")
    if experts != "stacked-trained":
        for block in moe_blocks(model):
            block.experts.requires_grad_(False)
    with torch.random.fork_rng():
        assert zero_expert_slots(model, torch.randint(0, VOCAB, (2, 7))) > 0
    if experts == "lora":
        model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False,
                                                 target_modules=["gate_proj", "up_proj", "down_proj"]))
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep, stack_experts=experts == "stacked-trained")
    ids = torch.randint(0, VOCAB, (2, 7))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads_ = loss_and_grads(model, ids)
    weights = {"frozen": "grouped layout", "stacked-trained": "grouped layout, stacked parameters",
               "lora": "grouped layout; LoRA stacked (3 projection x adapter)"}[experts]
    assert {b.weights for b in model._graph_moe_install_report.blocks} == {weights}
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_traced_once"] >= 1
    assert counters["graph_moe"]["loops_skipped"] == 0 and counters["graph_moe"]["weight_stacks_per_forward"] == 0
    assert keep.count("index_add_") == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads_.keys() == ref_grads.keys()
    assert_grads_close(grads_, ref_grads)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_longcat_qlora_experts_get_the_4bit_layout(tmp_path):
    """QLoRA on LongCat-Flash (bitsandbytes NF4 experts, the router and lm_head left in bf16 as transformers cannot
    run a 4-bit router): the 4-bit layout and the stacked adapters cover the MLP experts; equal to the untouched
    4-bit PEFT model, with tokens routed to zero experts."""
    from peft import LoraConfig, get_peft_model

    config = make_config("longcat_flash")
    config.hidden_size, config.ffn_hidden_size, config.expert_ffn_hidden_size = 64, 64, 128  # 4-bit blocks of 64
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  llm_int8_skip_modules=["classifier", "lm_head"])
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": "cpu"}).train()
    assert type(moe_blocks(model)[0].experts[0].gate_proj).__name__ == "Linear4bit"
    with torch.random.fork_rng():
        assert zero_expert_slots(model, torch.randint(0, VOCAB, (2, 7))) > 0
    model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False,
                                             target_modules=["gate_proj", "up_proj", "down_proj"]))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    ids = torch.randint(0, VOCAB, (4, 16))  # every expert gets tokens (eager leaves an idle one's gradient None)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads_ = loss_and_grads(model, ids)
    assert {b.weights for b in model._graph_moe_install_report.blocks} == {
        "grouped layout; LoRA stacked (3 projection x adapter)"}
    assert counters["graph_moe"]["loops_traced_once"] >= 1 and counters["graph_moe"]["weight_stacks_per_forward"] == 0
    assert counters["graph_moe"]["loops_skipped"] == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads_.keys() == ref_grads.keys()
    assert_grads_close(grads_, ref_grads)


def test_glm4v_moe_text_model_rewritten_and_equal():
    """check_model_rewritten, with the attention mask GLM4V needs."""
    model = build("glm4v_moe")
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    assert model._graph_moe_install_report.num_installed == 2, str(model._graph_moe_install_report)
    ids = torch.randint(0, VOCAB - 6, (2, 7))
    ref_logits, ref_grads = loss_and_grads(reference, ids, **forward_kwargs("glm4v_moe", ids))
    logits, grads_ = loss_and_grads(model, ids, **forward_kwargs("glm4v_moe", ids))
    assert counters["graph_moe"]["loops_skipped"] == 0, dict(counters["graph_moe"])
    assert counters["graph_moe"]["loops_rewritten"] == 1, dict(counters["graph_moe"])
    assert keep.count("_grouped_mm") + keep.count("grouped_mm") == 2 and keep.count("index_add_") == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads_.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_bf16(grads_[name], ref_grads[name], name)


def test_whole_model_rewrites_each_layer():
    """One graph for the whole model holds both MoE layers' loops: both are rewritten."""
    check_model_rewritten(build("dots1"), blocks=2, regional=False)


def test_frozen_experts_read_the_grouped_layout():
    """Frozen form D experts are laid out once: the grouped GEMMs read the stacks, no per-forward torch.stack.
    As in the released DeepSeek-V3, the first layer is dense (first_k_dense_replace): compiled, nothing to rewrite."""
    model = build("deepseek_v3", first_dense=1)
    for block in moe_blocks(model):
        block.experts.requires_grad_(False)
    keep = check_model_rewritten(model, blocks=1)
    assert [b.weights for b in model._graph_moe_install_report.blocks] == ["grouped layout"]
    assert keep.count("stack_weights") == 0
    assert graph_moe.counter_snapshot()["loops_traced_once"] == 1  # expert 0's body, grouped over all (traced_once.py)
    assert len(keep.graphs) >= 2  # the dense layer compiled as well


def test_lora_on_every_expert_stays_grouped():
    """PEFT LoRA (bf16 adapters) on every expert and shared-expert projection of GLM4-MoE: the base weights come
    from the layout, the loops are rewritten, loss and every adapter gradient equal eager."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(build("glm4_moe"), config, autocast_adapter_dtype=False)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert [b.weights for b in model._graph_moe_install_report.blocks] == ["grouped layout; LoRA stacked (3 projection x adapter)"] * 2
    ids = torch.randint(0, VOCAB, (2, 7))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads_ = loss_and_grads(model, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert counters["graph_moe"]["loops_traced_once"] == counters["graph_moe"]["loops_rewritten"]
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads_.keys() == ref_grads.keys()
    assert sum("lora_" in n for n in grads_) == 2 * (4 + 1) * 3 * 2  # layers x (experts + shared) x projections x A/B
    for name in ref_grads:
        assert_close_bf16(grads_[name], ref_grads[name], name)


# ---------------------------------------------------------------------------------------------------------------
# Structure checks: a block that does not look like the class the forward was written for is left alone.


def test_structure_checks_refuse_unexpected_layouts():
    v3 = moe_blocks(build("deepseek_v3", layers=1))[0]
    assert unsupported_reason(v3) is None
    v3.experts = torch.nn.ModuleList(list(v3.experts)[:-1])
    assert "experts" in unsupported_reason(v3)

    v2 = moe_blocks(build("deepseek_v2", layers=1))[0]
    v2.ep_rank = 1
    assert "expert-parallel" in unsupported_reason(v2)

    longcat = moe_blocks(build("longcat_flash", layers=1))[0]
    assert unsupported_reason(longcat) is None
    experts = list(longcat.experts)
    longcat.experts = torch.nn.ModuleList(experts[-1:] + experts[:-1])  # an identity expert first
    assert "identity" in unsupported_reason(longcat)

"""Ernie 4.5 MoE (transformers 4.57): the block's forward with its fp32 corrected-score router and shared experts,
rewritten into grouped GEMMs; logits and every gradient equal the untouched eager model, LoRA on the experts too."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from graph_moe.families import unsupported_reason
from helpers import check_model_rewritten


def _ernie(top_k=2, shared=1, bias=False):
    config = transformers.Ernie4_5_MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, moe_intermediate_size=32, moe_num_experts=4, moe_k=top_k, moe_layer_start_index=0,
        moe_num_shared_experts=shared, use_bias=bias)
    torch.manual_seed(0)
    # bf16 with the router and its correction bias in float32, as from_pretrained keeps them (_keep_in_fp32_modules_strict)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    for layer in model.model.layers:
        layer.mlp.gate.float(), layer.mlp.moe_statics.float()
    with torch.no_grad():  # a correction bias that changes which experts win, as a trained one does
        for layer in model.model.layers:
            layer.mlp.moe_statics.e_score_correction_bias.normal_(0, 0.01)
    return model


@pytest.mark.parametrize("top_k, shared", [(2, 1), (1, 0)])
def test_ernie_rewritten_and_equal(top_k, shared):
    model = _ernie(top_k, shared)
    blocks = [layer.mlp for layer in model.model.layers]
    assert all(type(b).__name__ == "Ernie4_5_MoeSparseMoeBlock" and unsupported_reason(b) is None for b in blocks)
    check_model_rewritten(model, blocks=2, seq_len=16)  # enough tokens that every expert gets some


def test_ernie_lora_on_the_experts_rewritten_and_equal():
    model = get_peft_model(_ernie(), LoraConfig(r=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                init_lora_weights=False))
    # under PEFT the first layer's input needs no gradient (frozen embeddings), the second's does: two graphs, each
    # with the base gate+up and down GEMMs (torch._grouped_mm) and six on PEFT's float32 adapters (graph_moe's op)
    check_model_rewritten(model, blocks=2, loops=2, grouped_per_loop=8, seq_len=16)

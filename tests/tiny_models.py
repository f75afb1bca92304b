"""Tiny transformers 4.x MoE causal LMs built from configs (random weights, no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def build(family: str, *, layers: int = 2, experts: int = 4, top_k: int = 2, dtype=torch.bfloat16, seed=0, **extra):
    torch.manual_seed(seed)
    common = dict(COMMON, num_hidden_layers=layers)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k, **extra)
        model = tf.MixtralForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, decoder_sparse_step=1, **extra)
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=32,
                                decoder_sparse_step=1, head_dim=8, **extra)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k, **extra)
        model = tf.OlmoeForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]

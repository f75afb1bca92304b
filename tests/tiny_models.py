"""Tiny transformers 4.x MoE causal LMs for tests (see graph_moe.tools.model_zoo)."""

from __future__ import annotations

import torch

from graph_moe.tools.model_zoo import build_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def build(family: str, *, layers: int = 2, experts: int = 4, top_k: int = 2, dtype=torch.bfloat16, seed=0, **extra):
    return build_model(family, layers=layers, experts=experts, top_k=top_k, hidden=32, intermediate=32, vocab=64,
                       dtype=dtype, seed=seed, **extra)

"""transformers 5.x 3D experts held in bitsandbytes NF4 (graph_moe.quantize_experts_4bit), LoRA through PEFT
target_parameters on top: the pass runs its 4-bit grouped GEMM on the packed stacks, and logits and LoRA gradients
equal PEFT's own forward over the same weights dequantized; the state dict round-trips."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")
pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graph_moe  # noqa: E402
from graph_moe.experts_4bit import Experts4bit  # noqa: E402
from helpers import Keep, assert_close_bf16, assert_grads_close, loss_and_grads  # noqa: E402
from tiny_models import build  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _with_weights_of(reference, quantized):
    """`reference` (a bf16 copy) with each 4-bit stack of `quantized` dequantized into its parameter."""
    for a, b in zip(quantized.modules(), reference.modules()):
        for name, value in vars(a).items():
            if isinstance(value, Experts4bit):
                getattr(b, name).data.copy_(value.dequantize(a))
    return reference


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_4bit_experts_with_lora_grouped_and_equal(family):
    model = build(family)  # as loaded: experts_implementation grouped_mm
    model = get_peft_model(model, LoraConfig(r=8, target_modules=[], target_parameters=TARGETS,
                                             init_lora_weights=False))
    reference = copy.deepcopy(model)
    bf16_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("_proj"))
    assert graph_moe.quantize_experts_4bit(model) == 4  # gate_up_proj and down_proj of two layers
    _with_weights_of(reference, model)
    held = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("_4bit", "_absmax")))
    assert held < bf16_bytes * 0.35, (held, bf16_bytes)  # 4 bits a weight plus one fp32 scale per 64

    keep = Keep()
    graph_moe.compile(model, inner=keep)
    report = model._graph_moe_install_report
    assert all("in 4-bit" in b.weights and "as grouped GEMMs" in b.weights for b in report.blocks), str(report)
    ids = torch.randint(0, 64, (2, 9))
    logits, grads = loss_and_grads(model, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert keep.count("grouped_mm_4bit") >= 2 and keep.count("index_add_") == 0  # gate+up and down, from 4-bit
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys() and all("lora" in name for name in grads)
    assert_grads_close(grads, ref_grads)


def test_4bit_experts_state_dict_round_trip():
    model = build("qwen3_moe")
    graph_moe.quantize_experts_4bit(model)
    state = model.state_dict()
    assert any(k.endswith("gate_up_proj_4bit") for k in state) and not any(k.endswith("gate_up_proj") for k in state)
    fresh = build("qwen3_moe", seed=1)
    graph_moe.quantize_experts_4bit(fresh)
    fresh.load_state_dict(state)
    graph_moe.install(model), graph_moe.install(fresh)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)

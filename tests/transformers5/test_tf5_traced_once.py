"""transformers 5.x experts (3D weights, and PEFT LoRA on them) under graph_moe.compile: the traceable forward's
bodies read row e of the 3D parameters and adapter factors, so Dynamo traces expert 0's alone and the pass groups it
over every expert; logits and every gradient equal eager, in float32."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import graph_moe  # noqa: E402
from helpers import loss_and_grads  # noqa: E402
from tiny_models import build  # noqa: E402


@pytest.mark.parametrize("experts", ["trained", "lora"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_3d_experts_traced_once_equal_eager(family, experts, traced):
    model = build(family, experts=8, dtype=torch.float32)
    if experts == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                            init_lora_weights=False)
        model = get_peft_model(model, config)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    for length in (7, 12):
        ids = torch.randint(0, 64, (2, length))
        (logits, grads), (ref_logits, ref_grads) = loss_and_grads(model, ids), loss_and_grads(reference, ids)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert ref_grads and grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    assert traced and set(traced) == {(1, True)}

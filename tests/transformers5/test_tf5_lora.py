"""PEFT LoRA on transformers 5.x 3D experts (`target_parameters`, ParamWrapper): the adapters stay grouped (base
grouped GEMM on the 3D parameter plus two grouped GEMMs per adapter), LoRA gradients equal PEFT's eager ones."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import graph_moe  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from helpers import assert_close_bf16, assert_grads_close, check_model_rewritten, loss_and_grads  # noqa: E402
from tiny_models import build  # noqa: E402

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _lora_model(family, layers=1, **implementation):
    model = build(family, layers=layers, **implementation)
    # Random B too (PEFT starts B at zero), so that every LoRA gradient is non-zero; r = 8 keeps the
    # adapter GEMMs on torch._grouped_mm (rows of whole 16-byte units).
    config = LoraConfig(r=8, lora_alpha=16, target_parameters=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config)


def _grouped_weights(keep):
    """The weight operand of each grouped GEMM, through its transpose."""
    return [n.args[1].args[0] for g in keep.graphs for n in g.graph.nodes
            if getattr(n.target, "__name__", None) in ("_grouped_mm", "grouped_mm")]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_target_parameters_grouped_and_equal(family):
    model = _lora_model(family)
    keep = check_model_rewritten(model, blocks=1, grouped_per_loop=6)  # logits and every LoRA gradient
    (entry,) = model._graph_moe_install_report.blocks
    assert "LoRA on gate_up_proj, down_proj as grouped GEMMs" in entry.weights, entry.weights
    weights = _grouped_weights(keep)
    # The base GEMMs read the two 3D parameters themselves: no W + B @ A, no copy, no concatenation.
    assert sum(w.op == "placeholder" for w in weights) == 2
    assert not any(getattr(n.target, "__name__", None) in ("baddbmm", "einsum", "cat") and
                   any(a in weights for a in n.all_input_nodes) for g in keep.graphs for n in g.graph.nodes)


def test_lora_under_inductor():
    """The default inner compiler too: Inductor chooses the layouts of the adapter stacks itself."""
    model = _lora_model("mixtral")
    reference = copy.deepcopy(model)
    graph_moe.compile(model)
    ids = torch.randint(0, 64, (2, 7))
    logits, grads = loss_and_grads(model, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] == 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys() and len(grads) == 4  # lora_A and lora_B of two parameters
    assert_grads_close(grads, ref_grads)


def test_lora_states_match_peft_eagerly():
    """Enabled, disabled and merged adapters: the installed forwards compute what PEFT's forwards compute (over the
    same eager loop: bit for bit where no adapter is added)."""
    model = _lora_model("mixtral", experts_implementation="eager")
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    ids = torch.randint(0, 64, (2, 7))

    def both():
        with torch.no_grad():
            return model(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()

    got, want = both()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    with model.disable_adapter(), reference.disable_adapter():
        got_off, want_off = both()
    torch.testing.assert_close(got_off, want_off, rtol=0, atol=0)  # the base model alone, bit for bit
    assert (got_off - got).abs().max() > 1e-2  # the adapters did change the output
    model.merge_adapter(), reference.merge_adapter()
    got, want = both()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_uninstall_restores_peft_forwards():
    model = _lora_model("qwen3_moe")
    graph_moe.install(model)
    bound = [m for m in model.modules() if "forward" in m.__dict__]
    assert sorted(type(m).__name__ for m in bound) == ["ParamWrapper", "ParamWrapper", "Qwen3MoeExperts"]
    assert graph_moe.uninstall(model) == 1
    assert not any("forward" in m.__dict__ for m in model.modules())

"""install(stack_experts=True): each block's expert weights as two parameters, read by the grouped GEMMs uncopied."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.stacked_experts import ExpertWeightSlice
from helpers import Keep, assert_close_bf16, loss_and_grads
from tiny_models import build


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


def _grads_match(grads, ref_grads):
    """Every eager gradient matched; the eager loop skips experts no token chose (no gradient there), the grouped
    GEMMs give them zeros."""
    assert set(ref_grads) <= set(grads), sorted(set(ref_grads) - set(grads))[:4]
    for name, grad in grads.items():
        if name in ref_grads:
            assert_close_bf16(grad, ref_grads[name], name)
        else:
            assert "experts" in name and not grad.any(), name


@pytest.mark.parametrize("family, stacked", [("qwen3_moe", True), ("mixtral", True), ("qwen3_moe", False)])
def test_full_fine_tuning_without_a_weight_copy(family, stacked):
    """Trained experts: stacked, the grouped GEMMs read the two stacks (no torch.stack in the graph, none counted);
    per expert, the pass stacks E weights per forward. Logits and every gradient equal the untouched eager model."""
    model = build(family, experts=8)
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep, stack_experts=stacked)
    weights = [b.weights for b in model._graph_moe_install_report.blocks]
    assert weights == (["grouped layout, stacked parameters"] if stacked else
                       [weights[0]]) * 2 and (stacked or "trainable experts" in weights[0]), weights
    ids = torch.randint(0, 64, (2, 7))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads = loss_and_grads(model, ids)
    assert_close_bf16(logits, ref_logits, "logits")
    _grads_match(grads, ref_grads)
    assert counters["graph_moe"]["loops_rewritten"] == 1 and keep.count("index_add_") == 0
    assert (counters["graph_moe"]["weight_stacks_per_forward"] > 0) != stacked
    if stacked:
        block = "block_sparse_moe" if family == "mixtral" else "mlp"
        names = [n for n, _ in model.named_parameters() if "expert" in n]
        assert names == [f"model.layers.{i}.{block}.graph_moe_experts.{s}" for i in range(2) for s in ("gate_up", "down")]


def test_state_dict_load_and_uninstall_keep_per_expert_weights(caplog):
    model = build("qwen3_moe")
    untouched = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="graph_moe"):
        graph_moe.install(model, stack_experts=True)
        graph_moe.install(model, stack_experts=True)  # already stacked: no second warning
    assert sum("create the optimizer" in r.getMessage() for r in caplog.records) == 1, caplog.text
    before = untouched.state_dict()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # A checkpoint of the untouched model loads into the stacks (fresh numbers, strict keys).
    new_state = {k: torch.randn_like(v) for k, v in before.items()}
    model.load_state_dict(new_state)
    block = _blocks(model)[1]
    assert torch.equal(block.graph_moe_experts.gate_up[2, 32:], new_state["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert torch.equal(block.experts[3].down_proj.weight, new_state["model.layers.1.mlp.experts.3.down_proj.weight"])
    # The expert Linears are views of the stacks: an in-place change is the stack's.
    with torch.no_grad():
        block.experts[0].gate_proj.weight.mul_(2)
    assert torch.equal(block.graph_moe_experts.gate_up[0, :32], 2 * new_state["model.layers.1.mlp.experts.0.gate_proj.weight"])
    graph_moe.uninstall(model)
    assert not any(type(m) is ExpertWeightSlice for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in untouched.named_parameters()]
    assert model.state_dict().keys() == before.keys()


def test_a_later_install_keeps_the_stacks_and_peft_wraps_the_slices():
    """PEFT after a stacked install: LoRA wraps each expert slice, the stacks freeze, and the grouped GEMMs read the
    stacks plus the (stacked) adapters; the adapters' gradients equal eager's."""
    from peft import LoraConfig, get_peft_model

    model = build("qwen3_moe", experts=8)
    graph_moe.install(model, stack_experts=True)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                  init_lora_weights=False), autocast_adapter_dtype=False)
    assert not _blocks(peft_model)[0].graph_moe_experts.gate_up.requires_grad
    reference = copy.deepcopy(peft_model)
    graph_moe.uninstall(reference)
    keep = Keep()
    graph_moe.compile(peft_model, inner=keep)
    assert [b.weights for b in peft_model._graph_moe_install_report.blocks] == [
        "grouped layout, stacked parameters; LoRA stacked (3 projection x adapter)"] * 2
    ids = torch.randint(0, 64, (2, 7))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads = loss_and_grads(peft_model, ids)
    assert_close_bf16(logits, ref_logits, "logits")
    _grads_match(grads, ref_grads)
    assert counters["graph_moe"].get("weight_stacks_per_forward", 0) == 0


def test_weight_changes_and_dtype_round_trip_after_compile_are_seen():
    model = build("mixtral")
    model.requires_grad_(False)
    reference = copy.deepcopy(model)
    graph_moe.install(model, stack_experts=True)
    compiled = torch.compile(model, backend=Keep().__call__)

    def check():
        ids = torch.randint(0, 64, (2, 6))
        with graph_moe.capture_settings(), torch.no_grad():
            assert_close_bf16(compiled(input_ids=ids, use_cache=False).logits, reference(input_ids=ids).logits)

    check()
    with torch.no_grad():
        for m in (model, reference):
            _blocks(m)[0].experts[1].w3.weight.mul_(-3)
    check()
    model.to(torch.float32).to(torch.bfloat16)  # the stacks are converted in place of themselves; slices follow
    assert _blocks(model)[0].experts[1].w3.weight.data_ptr() == _blocks(model)[0].graph_moe_experts.gate_up[1, 32:].data_ptr()
    check()

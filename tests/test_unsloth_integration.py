"""graph_moe.integrations.unsloth without Unsloth: what runs on every machine (the GPU run uses real Unsloth)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.integrations import unsloth as graph_moe_unsloth
from helpers import assert_close_bf16, assert_grads_close, loss_and_grads
from tiny_models import build

pytestmark = pytest.mark.skipif(graph_moe_unsloth.unsloth_available(), reason="checks the no-Unsloth behaviour")


def _apply(model):
    return graph_moe_unsloth.apply(model, inner="aot_eager")


def test_enable_without_unsloth_is_a_logged_no_op(caplog):
    with caplog.at_level(logging.INFO, logger="graph_moe"):
        assert graph_moe_unsloth.enable() is False
    assert "Unsloth is not installed" in caplog.text
    assert not hasattr(PeftModel.from_pretrained, "_graph_moe_wrapped")


def test_apply_compiles_each_block_and_matches_eager():
    model = build("qwen3_moe")
    reference = copy.deepcopy(model)
    _apply(model)
    blocks = [layer.mlp for layer in model.model.layers]
    assert all(b._compiled_call_impl is not None and b._graph_moe_installed for b in blocks)
    ids = torch.randint(0, 64, (2, 7))
    logits, grads = loss_and_grads(model, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert_grads_close(grads, ref_grads)
    compiled = [b._compiled_call_impl for b in blocks]
    _apply(model)  # idempotent: the same compiled blocks
    assert [b._compiled_call_impl for b in blocks] == compiled


def test_apply_again_after_lora_keeps_the_grouped_path():
    model = _apply(build("qwen3_moe"))
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    reference = copy.deepcopy(model)
    _apply(model)
    assert {b.weights for b in model._graph_moe_install_report.blocks} == {"grouped layout; LoRA stacked (3 projection x adapter)"}
    ids = torch.randint(0, 64, (2, 7))
    _, grads = loss_and_grads(model, ids)
    _, ref_grads = loss_and_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    lora = [n for n in ref_grads if "lora_" in n]
    assert len(lora) == 2 * 3 * 4 * 2
    for name in lora:
        assert_close_bf16(grads[name], ref_grads[name], name)


def test_adapter_loader_wrapper_installs_after_attach(tmp_path):
    """The wrapper enable() puts around PeftModel.from_pretrained, on the real PEFT loader."""
    base = build("qwen3_moe")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    load = graph_moe_unsloth._apply_after(PeftModel.from_pretrained.__func__, "PeftModel.from_pretrained")
    model = load(PeftModel, base, tmp_path)
    assert model._graph_moe_install_report.num_installed == 2
    assert all(layer.mlp._compiled_call_impl is not None for layer in model.base_model.model.model.layers)
    assert graph_moe_unsloth._apply_after(load, "again") is load  # wrapping twice is a no-op


def test_apply_on_a_model_without_moe_logs_and_leaves_it(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with caplog.at_level(logging.INFO, logger="graph_moe"):
        assert _apply(model) is model
    assert "no supported MoE block" in caplog.text and model[0]._compiled_call_impl is None


def test_global_inductor_pass_is_added_once_and_keeps_others():
    """What apply does under Unsloth: the pass in the global Inductor config its own compiles read."""
    from graph_moe.inductor_pass import GraphMoePass

    def users_pass(graph):
        return None

    with torch._inductor.config.patch(pre_grad_custom_pass=users_pass):
        model = graph_moe_unsloth.apply(build("qwen3_moe", layers=1), inner="aot_eager", global_pass=True)
        graph_moe_unsloth.add_global_inductor_pass()
        current = torch._inductor.config.pre_grad_custom_pass
        assert isinstance(current, GraphMoePass) and list(current.then) == [users_pass]
        assert model._graph_moe_install_report.num_installed == 1
    assert torch._inductor.config.pre_grad_custom_pass is None


def test_apply_passes_the_rewrite_settings_on(monkeypatch):
    """The rewrite's settings (here low_memory_4bit=False, for Unsloth's QLoRA users who want speed over peak memory)
    reach the blocks' backend and the global Inductor pass."""
    from graph_moe.inductor_pass import GraphMoePass

    made = []
    make_backend = graph_moe_unsloth.make_backend
    monkeypatch.setattr(graph_moe_unsloth, "make_backend", lambda *a, **kw: made.append(kw) or make_backend(*a, **kw))
    with torch._inductor.config.patch(pre_grad_custom_pass=None):
        model = graph_moe_unsloth.apply(build("qwen3_moe", layers=1), inner="aot_eager", global_pass=True,
                                        low_memory_4bit=False)
        current = torch._inductor.config.pre_grad_custom_pass
        assert isinstance(current, GraphMoePass)
        assert current.settings == graph_moe.RewriteSettings(fuse_projections=True, router_topk=True,
                                                             low_memory_4bit=False)
    assert len(made) == 1 and made[0]["settings"].low_memory_4bit is False
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 7)), use_cache=False)
    assert counters["graph_moe"]["loops_rewritten"] == 1

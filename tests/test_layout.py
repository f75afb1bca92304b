"""Frozen experts laid out once: no per-forward weight copy, and never stale after a weight change."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import graph_moe
from helpers import Recorder, assert_close_bf16, compile_by, evaluated_guards, loss_and_grads
from tiny_models import build


def _frozen(family="qwen3_moe", **kw):
    model = build(family, **kw)
    for block in _blocks(model):
        block.experts.requires_grad_(False)
    return model


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


def _ids():
    return torch.randint(0, 64, (2, 6))


def _compiled(model, rec):
    compiled = torch.compile(model, backend=rec.backend)

    def run(ids):
        with graph_moe.capture_settings():
            return compiled(input_ids=ids, use_cache=False).logits

    return run


def _compiled_by_graph_moe(model):
    """graph_moe.compile's regions: each decoder layer compiled on its own, the capture settings applied per call."""
    graph_moe.compile(model, inner="aot_eager")
    return lambda ids: model(input_ids=ids, use_cache=False).logits


# The two ways users compile: torch.compile with the backend, and graph_moe.compile's regions.
WAYS = ["torch.compile", "graph_moe.compile"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_layout_removes_the_weight_copy(family):
    model = _frozen(family)
    reference = copy.deepcopy(model)
    report = graph_moe.install(model)
    assert [b.weights for b in report.blocks] == ["grouped layout"] * 2
    rec = Recorder()
    ids = _ids()
    assert_close_bf16(_compiled(model, rec)(ids), reference(input_ids=ids).logits)
    assert counters["graph_moe"]["loops_rewritten"] == 2
    assert rec.count("_grouped_mm") == 4 and rec.count("stack_weights") == 0


def test_an_expert_with_another_activation_is_not_laid_out():
    """The layout applies one activation to every expert: an expert whose act_fn differs keeps its modules, and the
    pass, seeing bodies that differ, leaves that loop as traced; the numbers stay right."""
    from transformers.activations import ACT2FN

    model = _frozen()
    _blocks(model)[1].experts[2].act_fn = ACT2FN["gelu"]
    reference = copy.deepcopy(model)
    report = graph_moe.install(model)
    assert report.blocks[0].weights == "grouped layout"
    assert "expert 2's act_fn differs" in report.blocks[1].weights
    rec = Recorder()
    ids = _ids()
    assert_close_bf16(_compiled(model, rec)(ids), reference(input_ids=ids).logits)
    assert counters["graph_moe"]["loops_rewritten"] == 1 and counters["graph_moe"]["loops_skipped"] == 1


def test_layout_keeps_state_dict_and_views():
    model = _frozen()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph_moe.install(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    block = _blocks(model)[0]
    layout = block._graph_moe_layout
    storage = layout.gate_up.untyped_storage().data_ptr()
    assert all(x.gate_proj.weight.untyped_storage().data_ptr() == storage for x in block.experts)


def test_eager_fp32_layout_equals_original():
    model = _frozen("mixtral", dtype=torch.float32)
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    ids = _ids()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("way", WAYS)
def test_weight_changes_after_compile_are_seen(way):
    model = _frozen()
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    run = _compiled(model, Recorder()) if way == "torch.compile" else _compiled_by_graph_moe(model)
    run(_ids())

    def both(fn):
        with torch.no_grad():
            fn(model)
            fn(reference)
        ids = _ids()
        assert_close_bf16(run(ids), reference(input_ids=ids).logits)

    both(lambda m: _blocks(m)[0].experts[1].up_proj.weight.mul_(3))  # in place
    new_state = {k: torch.randn_like(v) * 0.05 for k, v in reference.state_dict().items()}
    both(lambda m: m.load_state_dict(new_state))  # copied into the views
    both(lambda m: setattr(_blocks(m)[1].experts[2].down_proj, "weight",
                           nn.Parameter(torch.randn(32, 32, dtype=torch.bfloat16) * 0.1, requires_grad=False)))
    assert _blocks(model)[1]._graph_moe_layout.valid is False  # that block fell back to its modules
    assert _blocks(model)[0]._graph_moe_layout.valid is True


CHANGES = {
    "new gate_proj": lambda b, fresh: setattr(b.experts[3], "gate_proj", fresh),
    "another expert's up_proj": lambda b, fresh: setattr(b.experts[0], "up_proj", b.experts[2].up_proj),
    # past nn.Module's registration hooks (which clear the layout's no_adapters): the slot marks still tell
    "down_proj put in _modules": lambda b, fresh: b.experts[1]._modules.__setitem__("down_proj", fresh),
    "expert put in the ModuleList's _modules": lambda b, fresh: b.experts._modules.__setitem__(
        "3", copy.deepcopy(b.experts[2])),
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("way", WAYS)
def test_replaced_or_swapped_expert_modules_are_seen(way, change):
    """A Linear or expert put in the block after compile (a new one, or another expert's) is not the laid-out one
    there: the block falls back to its modules, with the right numbers."""
    block = _blocks(_frozen())[0]
    reference = copy.deepcopy(block)
    graph_moe.install(block)
    if way == "torch.compile":
        compiled = torch.compile(block, backend=Recorder().backend)
    else:
        compiled = graph_moe.compile(block, inner="aot_eager")
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)

    def run():
        with torch.no_grad(), graph_moe.capture_settings():
            return compiled(x)[0]

    run()
    fresh = nn.Linear(32, 32, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        before = reference(x)[0]
        CHANGES[change](block, fresh), CHANGES[change](reference, copy.deepcopy(fresh))
        after = reference(x)[0]
    scale = after.abs().max()
    assert (after - before).abs().max() > 0.1 * scale  # the change matters: a stale expert would show
    assert (run() - after).abs().max() < 0.02 * scale


def test_dtype_round_trip_lays_out_again():
    model = _frozen()
    graph_moe.install(model)
    model.to(torch.float32).to(torch.bfloat16)
    block = _blocks(model)[0]
    storage = block._graph_moe_layout.gate_up.untyped_storage().data_ptr()
    assert block.experts[3].up_proj.weight.untyped_storage().data_ptr() == storage
    reference = copy.deepcopy(model)
    graph_moe.uninstall(reference)
    rec = Recorder()
    ids = _ids()
    assert_close_bf16(_compiled(model, rec)(ids), reference(input_ids=ids).logits)
    assert rec.count("stack_weights") == 0


def test_peft_after_install_uses_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = _frozen()
    graph_moe.install(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                  init_lora_weights=False))
    report = graph_moe.install(peft_model)
    assert all(b.status == "already installed" for b in report.blocks)
    reference = copy.deepcopy(peft_model)
    graph_moe.uninstall(reference)
    rec = Recorder()
    ids = _ids()
    compiled = torch.compile(peft_model, backend=rec.backend)
    with graph_moe.capture_settings():
        out = compiled(input_ids=ids, use_cache=False).logits
    assert_close_bf16(out, reference(input_ids=ids).logits)
    assert counters["graph_moe"]["loops_found"] == 2


# torch 2.10 and 2.11 skip the guards below a module whose __dict__ did not change (recursive dict tags, on by default
# there, off from 2.12): a weight's requires_grad_(True) changes no dict.
DICT_TAGS = {"dict tags off": False, "dict tags on": True}


@pytest.mark.parametrize("dict_tags", DICT_TAGS)
@pytest.mark.parametrize("change", ["unfreeze", "peft"])
@pytest.mark.parametrize("way", WAYS)
def test_changes_after_compile_are_seen(way, change, dict_tags):
    """An expert unfrozen, or LoRA added, after the first compiled call is seen on the next (outputs and gradients
    as eager), with Dynamo's recursive dict-tag guards on or off."""
    # config.patch restores the option by value (monkeypatch.setattr would delete it from the config module at
    # teardown, hiding it from every later test of the process); the option exists on torch 2.10-2.13 only.
    patch = (torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=DICT_TAGS[dict_tags])
             if hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards") else contextlib.nullcontext())
    with patch:
        _check_changes_after_compile(way, change)


def _check_changes_after_compile(way, change):
    from peft import LoraConfig, get_peft_model

    model = _frozen()
    reference = copy.deepcopy(model)
    call = compile_by(way, model)
    ids = _ids()
    with graph_moe.capture_settings():
        loss_and_grads(call, ids)
    if change == "unfreeze":
        for m in (model, reference):
            _blocks(m)[0].experts[2].gate_proj.weight.requires_grad_(True)
        expected = {"experts.2.gate_proj.weight"}
    else:
        config = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
        torch.manual_seed(0)
        model = get_peft_model(model, config)
        torch.manual_seed(0)
        reference = get_peft_model(reference, config)
        graph_moe.install(model)
        call = model if way == "graph_moe.compile" else torch.compile(model, backend=graph_moe.make_backend("aot_eager"))
        expected = {"experts.1.up_proj.lora_B.default.weight"}
    with graph_moe.capture_settings():
        logits, grads = loss_and_grads(call, ids)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    assert_close_bf16(logits, ref_logits, "logits")
    trained = {n for n in ref_grads if any(n.endswith(e) for e in expected)}
    assert trained and trained <= grads.keys()
    for name in ref_grads:
        if "experts" in name:
            assert_close_bf16(grads[name], ref_grads[name], name)


def test_unfrozen_expert_trains_through_the_modules():
    """An expert unfrozen after install: with grad on, its block falls back to the modules and the weight gets its
    gradient. Under no_grad its requires_grad is not checked (nothing is differentiated; the weights are views of the
    stacks): the layout stays in use, with eager's numbers."""
    model = _frozen()
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    for m in (model, reference):
        _blocks(m)[0].experts[2].gate_proj.weight.requires_grad_(True)
    rec = Recorder()
    run = _compiled(model, rec)
    ids = _ids()
    with torch.no_grad():
        assert_close_bf16(run(ids), reference(input_ids=ids).logits)
    assert rec.count("stack_weights") == 0  # every block ran on its layout
    out, ref = run(ids), reference(input_ids=ids).logits
    seed = torch.randn_like(ref)
    out.backward(seed), ref.backward(seed)
    assert_close_bf16(out, ref)
    assert rec.count("stack_weights") > 0  # the block with the unfrozen expert stacked its modules' weights
    assert_close_bf16(_blocks(model)[0].experts[2].gate_proj.weight.grad,
                      _blocks(reference)[0].experts[2].gate_proj.weight.grad)
    assert counters["graph_moe"]["loops_rewritten"] == 4  # two blocks, in the no_grad graph and the grad one


@pytest.mark.parametrize("adapters", ["frozen", "lora"])
@pytest.mark.parametrize("way", WAYS)
def test_guards_do_not_grow_with_the_experts(way, adapters):
    """The facts of every expert projection that the layout depends on (layout_check.py) are checked in plain Python
    before each call (of a graph_moe.compile region, or of the model given to torch.compile), so Dynamo's guards,
    evaluated on every call, do not grow with the number of experts (with PEFT LoRA at E=128 they had cost 2-4 ms
    per decoder layer and call on an H200's host), and the verdict does not outlive the call."""
    from peft import LoraConfig, get_peft_model

    guards = {}
    for experts in (4, 12):
        torch._dynamo.reset()
        model = _frozen(experts=experts)
        if adapters == "lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                     init_lora_weights=False))
        call = compile_by(way, model, "eager")
        with graph_moe.capture_settings():
            loss_and_grads(call, _ids())
        guards[experts] = evaluated_guards(model)
        assert not any(block._graph_moe_layout.verified for block in _blocks(model))
        assert counters["graph_moe"]["loops_rewritten"] > 0
    # A guard per expert would add 16 here (8 more experts in each of 2 layers); a guard or two may come and go with
    # how Dynamo dedups the rest
    assert abs(guards[12] - guards[4]) <= 2, guards


def test_the_model_checks_its_layouts_around_each_call():
    """graph_moe.install hooks the model (layout_check.watch; uninstall unhooks it): each call verifies its blocks'
    layouts in plain Python before the forward and clears the verdicts after it, also when the forward raises; a deep
    copy checks its own blocks; compiled inside another module (the hooks traced), they do nothing, with no graph
    break."""
    model = _frozen()
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    seen = []

    def record(block, args):
        seen.append(block._graph_moe_layout.verified)

    for block in _blocks(model):
        block.register_forward_pre_hook(record)
    ids = _ids()
    model(input_ids=ids)
    assert seen == [True, True]
    assert not any(block._graph_moe_layout.verified for block in _blocks(model))
    with pytest.raises(Exception):
        model(input_ids=ids.float())  # token ids as floats: the embedding raises after the hooks ran
    assert not any(block._graph_moe_layout.verified for block in _blocks(model))

    copied = copy.deepcopy(model)
    seen.clear()
    copied(input_ids=ids)
    assert seen == [True, True]  # the copy's blocks (their own pre-hooks, copied too) verified by the copy's hooks

    class Outer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    with graph_moe.capture_settings():
        out = torch.compile(Outer(model), backend=graph_moe.make_backend("aot_eager"), fullgraph=True)(ids)
    assert_close_bf16(out, reference(input_ids=ids).logits)
    assert counters["graph_moe"]["loops_rewritten"] == 2
    assert not any(block._graph_moe_layout.verified for block in _blocks(model))
    graph_moe.uninstall(model)
    assert not model._forward_pre_hooks and not model._forward_hooks

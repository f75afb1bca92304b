"""LoRA on every expert (PEFT, transformers 4.57): the adapters stay on the grouped path, equal to eager."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.stacked_adapters import split_stacked
from helpers import assert_close_bf16, assert_grads_close, assert_training_tracks_eager, compile_by
from tiny_models import build


def _lora_model(adapter_fp32: bool, dropout=0.0):
    model = build("qwen3_moe")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config, autocast_adapter_dtype=adapter_fp32)


def _loss_and_lora_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), split_stacked({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})


@pytest.mark.parametrize("adapter_fp32", [True, False], ids=["fp32-adapters", "bf16-adapters"])
def test_lora_on_every_expert_matches_eager(adapter_fp32):
    model = _lora_model(adapter_fp32)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert {b.weights for b in model._graph_moe_install_report.blocks} == {
        "grouped layout; LoRA stacked (3 projection x adapter)"}  # base weights laid out, adapters stacked
    ids = torch.randint(0, 64, (2, 6))
    loss, grads = _loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert_close_bf16(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 3 * 4 * 2  # layers x projections x experts x A/B
    assert_grads_close(grads, ref_grads)


def _lora_qwen3_matches_eager(rank: int, lora_alpha: int, intermediate: int, float32_adapters: bool = False):
    """A one-layer Qwen3-MoE (hidden 64) with bf16 LoRA (or PEFT's default float32 adapters) on every expert
    projection, compiled through graph_moe with its graphs kept: loss and every adapter gradient equal an eager
    copy's. Returns the kept graphs."""
    from graph_moe.tools.model_zoo import build_model
    from helpers import Keep

    model = build_model("qwen3_moe", layers=1, experts=4, top_k=2, hidden=64, intermediate=intermediate, vocab=64)
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights=False,
                        target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model.to(torch.bfloat16), config, autocast_adapter_dtype=float32_adapters)
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 9))
    loss, grads = _loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert_close_bf16(loss, ref_loss, "loss")
    assert_grads_close(grads, ref_grads)
    return keep


def test_gate_and_up_lora_a_factors_share_one_grouped_gemm():
    """Rank 8 on hidden 64: the A factors of gate and up are thin stacks, read the same rows as the base GEMM and
    become one grouped GEMM (7 per forward, not 8)."""
    keep = _lora_qwen3_matches_eager(rank=8, lora_alpha=16, intermediate=64)
    # base gate+up, fused A factors, gate B, up B, down, down A, down B
    assert keep.count("_grouped_mm") == 7 and keep.count("grouped_mm") == 0


def test_float32_lora_a_factors_share_one_grouped_gemm():
    """PEFT's default float32 adapters on a bf16 model: each adapter casts the rows to float32 on its own, and gate's
    and up's A factors, reading equal casts of the same rows, still become one grouped GEMM (on graph_moe's op, as
    float32 takes): one read of the float32 rows instead of two, and one input gradient. Equal to eager."""
    keep = _lora_qwen3_matches_eager(rank=8, lora_alpha=16, intermediate=64, float32_adapters=True)
    # base gate+up and down on torch._grouped_mm; fused A factors, gate B, up B, down A, down B on the float32 op
    assert keep.count("_grouped_mm") == 2 and keep.count("grouped_mm") == 5
    assert not [n for g in keep.graphs for n in g.graph.nodes if n.target == "to" and not n.users]  # no dead cast


def test_lora_scaling_is_applied_to_the_rank_wide_a_output():
    """LoRA's scaling multiplies the r-wide A output, not the B output (hidden- or intermediate-wide): its backward
    then hands B and the base weight one output gradient instead of a scaled copy of it (Inductor wrote both, each
    rows x hidden). Scaling 3 (not a power of two, so rounding differs from PEFT's order): still equal to eager."""
    rank = 8
    keep = _lora_qwen3_matches_eager(rank=rank, lora_alpha=3 * rank, intermediate=48)
    scaled = [n.meta["example_value"].shape[-1] for g in keep.graphs for n in g.graph.nodes
              if n.op in ("call_function", "call_method") and "mul" in str(n.target) and 3.0 in n.args]
    assert scaled and set(scaled) == {rank}, scaled  # gate, up and down, each on its (rows, r) A output


def test_float32_adapters_under_autocast_take_the_grouped_gemms():
    """PEFT's default float32 adapters in a bf16 model under torch.autocast (the HF Trainer with bf16=True): the pass
    emits autocast's casts, so every projection runs on torch._grouped_mm (none on the fallback op), and loss and
    adapter gradients equal eager PEFT under the same autocast."""
    from graph_moe.tools.model_zoo import build_model
    from helpers import Keep

    model = build_model("qwen3_moe", layers=1, experts=4, top_k=2, hidden=64, intermediate=64, vocab=64)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model.to(torch.bfloat16), config)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_lora_grads(model, ids)
        ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert keep.count("_grouped_mm") == 7 and keep.count("grouped_mm") == 0  # gate's and up's A factors fused
    assert_close_bf16(loss, ref_loss, "loss")
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        assert_close_bf16(grads[name], ref_grads[name], name)


def test_lora_training_steps_track_eager():
    model = _lora_model(adapter_fp32=True)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert_training_tracks_eager(model, reference)


def test_lora_dropout_is_rewritten():
    model = _lora_model(adapter_fp32=False, dropout=0.1)
    explanation = graph_moe.explain(model, torch.randint(0, 64, (1, 6)))
    assert explanation.rewritten == 2, str(explanation)


def test_merged_adapters_fall_back_to_the_modules():
    model = _lora_model(adapter_fp32=False)
    graph_moe.compile(model, inner="aot_eager")
    ids = torch.randint(0, 64, (2, 6))
    for merge in (True, False):
        (model.merge_adapter if merge else model.unmerge_adapter)()
        reference = copy.deepcopy(model)
        graph_moe.uninstall(reference)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
            ref = reference(input_ids=ids, use_cache=False).logits
        assert_close_bf16(out, ref, f"merged={merge}")


def _save_adapters(path, names):
    """Adapters `names` for the tiny Qwen3-MoE, each with its own random weights, saved under `path`/<name>."""
    for i, name in enumerate(names):
        base = build("qwen3_moe")
        torch.manual_seed(10 + i)  # after build, which seeds its own weights
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])
        get_peft_model(base, config, autocast_adapter_dtype=False).save_pretrained(path / name)


def test_adapters_loaded_after_install_and_the_active_one(tmp_path):
    """PeftModel.from_pretrained on a graph_moe-compiled model, a second adapter, set_adapter: the compiled model
    follows the active adapter, rewritten, equal to eager PEFT."""
    from peft import PeftModel

    _save_adapters(tmp_path, ["first", "second"])
    model = graph_moe.compile(build("qwen3_moe"), inner="aot_eager")
    model = PeftModel.from_pretrained(model, tmp_path / "first", adapter_name="first", autocast_adapter_dtype=False)
    model.load_adapter(tmp_path / "second", adapter_name="second", autocast_adapter_dtype=False)
    reference = PeftModel.from_pretrained(build("qwen3_moe"), tmp_path / "first", adapter_name="first",
                                          autocast_adapter_dtype=False)
    reference.load_adapter(tmp_path / "second", adapter_name="second", autocast_adapter_dtype=False)
    ids = torch.randint(0, 64, (2, 6))
    losses = {}
    for name in ("first", "second"):
        model.set_adapter(name), reference.set_adapter(name)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, use_cache=False).loss
            ref = reference(input_ids=ids, labels=ids, use_cache=False).loss
        assert_close_bf16(out, ref, f"loss with adapter {name}")
        losses[name] = ref.item()
    assert losses["first"] != losses["second"]  # the adapters differ: the active one is what counts
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0


def test_stacked_adapters_are_read_without_a_copy_and_trained_as_one_parameter():
    """Each projection's adapters are one (E, r, in) and one (E, out, r) parameter: the graph takes them as they are
    (no stack op, a handful of inputs instead of one per expert), and each gets one gradient."""
    from helpers import Keep

    model = _lora_model(adapter_fp32=False)
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    stacks = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(stacks) == 2 * 3 * 2 and all(".graph_moe_adapters." in n for n in stacks), stacks
    ids = torch.randint(0, 64, (2, 6))
    loss, grads = _loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert_close_bf16(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys()
    assert_grads_close(grads, ref_grads)
    assert keep.count("stack_weights") == 0 and keep.count("index_add_") == 0
    inputs = [n for g in keep.graphs for n in g.graph.nodes if n.op == "placeholder"]
    assert len(inputs) < 4 * 3 * 2 + 20, len(inputs)  # one expert's adapters alone would be 2 x 3 x 4


def test_stacked_adapters_keep_peft_state_dict_and_files(tmp_path):
    """state_dict keys and values, save_pretrained files and load_state_dict stay PEFT's, per expert; uninstall
    hands each expert its own parameters back."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    model = _lora_model(adapter_fp32=False)
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    expected = reference.state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=key)
    assert get_peft_model_state_dict(model).keys() == get_peft_model_state_dict(reference).keys()

    # An update to the stacks shows in the saved files, and loads back into a stacked model and a plain one.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".graph_moe_adapters." in n:
                p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert len(saved) == 2 * 3 * 4 * 2
    fresh = PeftModel.from_pretrained(build("qwen3_moe"), tmp_path / "saved", autocast_adapter_dtype=False)
    stacked_fresh = copy.deepcopy(_lora_model(adapter_fp32=False))
    graph_moe.install(stacked_fresh)
    stacked_fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
        for other in (fresh, stacked_fresh):
            torch.testing.assert_close(other(input_ids=ids, use_cache=False).logits, out, rtol=0, atol=0)
    assert graph_moe.uninstall(model) == 2
    assert not any(".graph_moe_adapters." in n for n, _ in model.named_parameters())
    assert sum(p.requires_grad for p in model.parameters()) == 2 * 3 * 4 * 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, out, rtol=0, atol=0)


def test_stacked_adapters_in_eager_and_merged():
    """Installed, not compiled: eager PEFT code reads each expert's row of the stack (gradients reach the stacks);
    merging adds the stacked adapters into the base weights as PEFT does."""
    model = _lora_model(adapter_fp32=False)
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    ids = torch.randint(0, 64, (2, 6))
    loss, grads = _loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert_close_bf16(loss, ref_loss, "loss")
    assert_grads_close(grads, ref_grads)
    model.merge_adapter(), reference.merge_adapter()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_merge_and_unload_of_stacked_adapters():
    """PEFT's merge_and_unload on an installed model: the merged weights and the saved keys are PEFT's (the stacks
    left behind write nothing), and the next install drops them."""
    model = _lora_model(adapter_fp32=False)
    reference = copy.deepcopy(model)
    graph_moe.install(model)
    merged, ref_merged = model.merge_and_unload(), reference.merge_and_unload()
    state, ref_state = merged.state_dict(), ref_merged.state_dict()
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=0, msg=key)
    graph_moe.install(merged)
    assert not any(".graph_moe_adapters." in n for n, _ in merged.named_parameters())


def test_peft_set_adapter_freezes_and_unfreezes_the_stacks():
    """PEFT's set_adapter turns requires_grad off (inference_mode) and on again through each expert's lora_A/lora_B
    Linear: with stacked adapters that must reach the stacks, or the adapters would silently stop training."""
    from peft.tuners.lora import LoraLayer

    model = _lora_model(adapter_fp32=False)
    graph_moe.install(model)
    stacks = [p for n, p in model.named_parameters() if ".graph_moe_adapters." in n]
    for inference_mode in (True, False):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter("default", inference_mode=inference_mode)
        assert all(p.requires_grad is not inference_mode for p in stacks)


@pytest.mark.parametrize("change", ["scaling", "dropout", "dropout p in place", "adapter off", "adapters disabled",
                                    "merged"])
@pytest.mark.parametrize("way", ["graph_moe.compile", "torch.compile"])
def test_one_expert_changed_after_compile_is_seen(way, change):
    """One expert's PEFT state (scaling, dropout, active adapters, adapters disabled, merged) changed alone after
    compiling, in place or by assignment, is seen: the output equals eager. (These facts are checked in plain Python
    before each call of a graph_moe.compile region, or of the model torch.compile compiled, layout_check.py: each
    change must reach that check.)"""
    model = _lora_model(adapter_fp32=False, dropout=0.5 if change == "dropout p in place" else 0.0)
    for module in model.modules():  # dropout modules that drop nothing yet (p changed in place below)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(model)
    call = compile_by(way, model)
    ids = torch.randint(0, 64, (2, 6))
    model.train(), reference.train()
    with torch.no_grad(), graph_moe.capture_settings():
        before = call(input_ids=ids, use_cache=False).logits

    def apply(m):
        up = [b for b in m.modules() if type(b).__name__.endswith("SparseMoeBlock")][0].experts[3].up_proj
        if change == "scaling":
            up.scaling["default"] *= 4
        elif change == "dropout":  # train mode: drops every input of that adapter
            up.lora_dropout["default"] = torch.nn.Dropout(p=1.0)
        elif change == "dropout p in place":
            up.lora_dropout["default"].p = 1.0
        elif change == "adapter off":
            up._active_adapter = []
        elif change == "adapters disabled":
            up.enable_adapters(False)
        else:
            up.merge()

    apply(model), apply(reference)
    with torch.no_grad(), graph_moe.capture_settings():
        out = call(input_ids=ids, use_cache=False).logits
        ref = reference(input_ids=ids, use_cache=False).logits
    assert (ref - before).abs().max() > 1e-3  # the change matters
    assert_close_bf16(out, ref, change)

"""bitsandbytes 4-bit experts (QLoRA, transformers 4.57): one dequantize per projection, then the grouped path.

The reference is the same 4-bit model left untouched (bitsandbytes' own Linear4bit and PEFT's own LoRA layers).
"""

from __future__ import annotations


import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.stacked_adapters import split_stacked
from graph_moe.tools.model_zoo import build_model
from helpers import Keep, assert_close_bf16, assert_grads_close, assert_training_tracks_eager

PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    # intermediate != hidden: the gate_up and down stacks differ in shape; both multiples of the 4-bit block size (64),
    # which the CPU needs for a layout (test_4bit_rows_of_partial_blocks_are_not_laid_out_on_the_cpu)
    build_model("qwen3_moe", layers=2, experts=4, top_k=2, hidden=64, intermediate=128, vocab=64, seed=1).save_pretrained(path)
    return path


def _load_4bit(path, *, double_quant=False, quant_type="nf4", device="cpu"):
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.bfloat16,
                                   bnb_4bit_use_double_quant=double_quant)
    # device_map even for the CPU: without one, transformers puts a 4-bit model on the GPU where there is one.
    # Train mode (no dropout in this model), as a fine-tuning loop runs: in eval mode, on a CPU with AVX512-BF16,
    # bitsandbytes repacks 4-bit weights in place for its CPU kernel on the first forward (and fails when
    # in_features < block size); train mode keeps the packing its GPU kernels read, on every CPU.
    return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16,
                                                   device_map={"": device}).train()


def _qlora(path, *, gradient_checkpointing=None, **quant):
    model = _load_4bit(path, **quant)
    if gradient_checkpointing is not None:
        # What QLoRA recipes run: norms to fp32, input grads on, transformers' gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gradient_checkpointing)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=PROJECTIONS)
    torch.manual_seed(0)  # the same adapters in the model and its reference
    return get_peft_model(model, config)


def _loss_and_lora_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), split_stacked({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})


def _dequantize_calls(keep):
    return keep.count("dequantize_4bit")


@pytest.mark.parametrize("quant", [dict(), dict(double_quant=True, quant_type="fp4")], ids=["nf4", "fp4-double-quant"])
def test_4bit_experts_inference_equals_bitsandbytes(saved_model, quant):
    model, reference = _load_4bit(saved_model, **quant), _load_4bit(saved_model, **quant)
    keep = Keep()
    graph_moe.compile(model, inner=keep, low_memory_4bit=False)  # whole stacks dequantized at once
    assert {b.weights for b in model._graph_moe_install_report.blocks} == {"grouped layout"}
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert_close_bf16(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, "logits")
    assert counters["graph_moe"]["loops_rewritten"] == 1 and counters["graph_moe"]["loops_skipped"] == 0
    # one dequantize of all experts per projection stack (gate+up, down), two grouped GEMMs, no loop left
    assert keep.count("_grouped_mm") == 2 and keep.count("index_add_") == 0
    assert _dequantize_calls(keep) == 2
    # each projection dequantized just before its grouped GEMM: the bf16 stacks are never alive together
    order = [n.target.__name__ for g in keep.graphs for n in g.graph.nodes
             if getattr(n.target, "__name__", None) in ("dequantize_4bit", "_grouped_mm")]
    assert order == ["dequantize_4bit", "_grouped_mm"] * 2, order


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("quant", [dict(), dict(double_quant=True, quant_type="fp4")], ids=["nf4", "fp4-double-quant"])
def test_4bit_stacks_dequantize_to_each_experts_own_weights(saved_model, quant, device):
    """The layout's one dequantize per projection gives, bit for bit, what each expert's Linear4bit dequantizes: the
    tolerance of the model comparisons above would hide a few wrong blocks. On CUDA too (bitsandbytes' kernels differ
    by device: see the next test)."""
    from bitsandbytes.functional import dequantize_4bit

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _load_4bit(saved_model, device=device, **quant)
    block = model.model.layers[0].mlp
    own = [[dequantize_4bit(getattr(x, n).weight.data, getattr(x, n).weight.quant_state) for n in PROJECTIONS]
           for x in block.experts]
    graph_moe.install(model)
    layout = block._graph_moe_layout
    gate_up, down = layout.gate_up.dequantize(), layout.down.dequantize()
    for e, (gate, up, down_e) in enumerate(own):
        assert torch.equal(gate_up[e], torch.cat([gate, up])) and torch.equal(down[e], down_e), e


def test_4bit_rows_of_partial_blocks_are_not_laid_out_on_the_cpu(tmp_path):
    """Regression: down_proj's in_features 96 is 1.5 blocks of 64, and bitsandbytes' CPU dequantize gave a
    stack of such experts other numbers than each expert's own (logits off by 0.0036 in float32), which the bf16
    tolerance of the comparisons hid. On the CPU those experts are not laid out, the install report says why, and the
    compiled model equals bitsandbytes."""
    build_model("qwen3_moe", layers=1, experts=4, top_k=2, hidden=64, intermediate=96, vocab=64, seed=2).save_pretrained(tmp_path)
    model, reference = _load_4bit(tmp_path), _load_4bit(tmp_path)
    graph_moe.compile(model, inner="aot_eager")
    (block,) = model._graph_moe_install_report.blocks
    assert "in_features 96 is not a multiple of the 4-bit block size 64" in block.weights, block.weights
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert_close_bf16(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, "logits")


def test_4bit_partial_block_stacks_dequantize_exactly_on_cuda(tmp_path):
    """On CUDA the layout takes experts whose rows are not whole blocks (bitsandbytes' CUDA dequantize runs over the
    flat elements): their stacks must dequantize bit for bit to each expert's own, or the CPU rule must cover CUDA."""
    from bitsandbytes.functional import dequantize_4bit

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    build_model("qwen3_moe", layers=1, experts=4, top_k=2, hidden=64, intermediate=96, vocab=64, seed=2).save_pretrained(tmp_path)
    model = _load_4bit(tmp_path, device="cuda")
    block = model.model.layers[0].mlp
    own = [dequantize_4bit(x.down_proj.weight.data, x.down_proj.weight.quant_state) for x in block.experts]
    report = graph_moe.install(model)
    assert report.blocks[0].weights == "grouped layout", str(report)
    down = block._graph_moe_layout.down.dequantize()
    for e, weights in enumerate(own):
        assert torch.equal(down[e], weights), e


def test_4bit_layout_keeps_weights_4bit_and_shared(saved_model):
    model = _load_4bit(saved_model)
    before = {n: p.data.clone() for n, p in model.named_parameters() if "experts" in n}
    graph_moe.install(model)
    layout = model.model.layers[0].mlp._graph_moe_layout
    assert layout.gate_up.packed.dtype == torch.uint8 and layout.down.packed.dtype == torch.uint8  # no bf16 copy
    expert = model.model.layers[0].mlp.experts[1]
    assert expert.up_proj.weight.data.untyped_storage().data_ptr() == layout.gate_up.packed.untyped_storage().data_ptr()
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.data, before[n]), n  # same packed bytes, now views


@pytest.mark.parametrize("low_memory_4bit", [False, True], ids=["", "low-memory"])
@pytest.mark.parametrize("gradient_checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}],
                         ids=["plain", "checkpointing-reentrant", "checkpointing-non-reentrant"])
def test_qlora_loss_and_lora_grads_equal_eager(saved_model, gradient_checkpointing, low_memory_4bit):
    model = _qlora(saved_model, gradient_checkpointing=gradient_checkpointing)
    reference = _qlora(saved_model, gradient_checkpointing=gradient_checkpointing)
    model.train(), reference.train()
    keep = Keep()
    graph_moe.compile(model, inner=keep, low_memory_4bit=low_memory_4bit)
    weights = {b.weights for b in model._graph_moe_install_report.blocks}
    assert weights == {"grouped layout; LoRA stacked (3 projection x adapter)"}
    ids = torch.randint(0, 64, (2, 7))
    loss, grads = _loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert keep.count("index_add_") == 0 and (keep.count("grouped_mm_4bit") > 0) == low_memory_4bit
    assert_close_bf16(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 3 * 4 * 2  # layers x projections x experts x A/B
    assert_grads_close(grads, ref_grads)


def test_qlora_training_steps_track_eager(saved_model):
    model = _qlora(saved_model)
    reference = _qlora(saved_model)
    graph_moe.compile(model, inner="aot_eager")
    assert_training_tracks_eager(model, reference, tolerance=3e-2)
    assert counters["graph_moe"]["loops_skipped"] == 0


def test_dequantized_experts_are_not_saved_for_backward(saved_model):
    """The one dequantize per projection runs again in the backward: saving its bf16 result would keep a full
    precision copy of every layer's experts from forward to backward, what 4-bit weights are there to avoid."""
    model = _qlora(saved_model)
    graph_moe.compile(model, inner="aot_eager")
    ids = torch.randint(0, 64, (2, 7))
    _loss_and_lora_grads(model, ids)  # compiles
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        loss, grads = _loss_and_lora_grads(model, ids)
    stacks = {((4, 96, 32), torch.bfloat16), ((4, 32, 48), torch.bfloat16), ((4, 32, 96), torch.bfloat16),
              ((4, 48, 32), torch.bfloat16)}  # gate_up (E, 2I, H), down (E, H, I), and their transposes
    assert saved and not stacks & set(saved), sorted(map(str, stacks & set(saved)))
    assert counters["graph_moe"]["loops_skipped"] == 0 and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("quant", [dict(), dict(double_quant=True, quant_type="fp4")], ids=["nf4", "fp4-double-quant"])
def test_low_memory_4bit_reads_the_4bit_stacks(saved_model, quant):
    """By default (low_memory_4bit=True) both grouped GEMMs are graph_moe::grouped_mm_4bit on the packed stacks (the
    experts dequantized a few at a time inside it, graph_moe/kernels/grouped_mm_4bit.py); no dequantize left in the graph."""
    model, reference = _load_4bit(saved_model, **quant), _load_4bit(saved_model, **quant)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert_close_bf16(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, "logits")
    assert counters["graph_moe"]["loops_rewritten"] == 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert keep.count("grouped_mm_4bit") == 2 and keep.count("_grouped_mm") == keep.count("index_add_") == 0
    assert _dequantize_calls(keep) == 0


def test_low_memory_4bit_qlora_grads_equal_eager_and_save_no_stack(saved_model):
    model, reference = _qlora(saved_model), _qlora(saved_model)
    graph_moe.compile(model, inner="aot_eager", low_memory_4bit=True)
    ids = torch.randint(0, 64, (2, 7))
    loss, grads = _loss_and_lora_grads(model, ids)
    ref_loss, ref_grads = _loss_and_lora_grads(reference, ids)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert_close_bf16(loss, ref_loss, "loss")
    assert_grads_close(grads, ref_grads)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        _loss_and_lora_grads(model, ids)
    assert saved and not {shape for shape, dtype in saved if dtype == torch.bfloat16} & {
        (4, 96, 32), (4, 32, 48), (4, 32, 96), (4, 48, 32)}

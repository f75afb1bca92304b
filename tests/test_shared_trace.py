"""`graph_moe.install(model, shared_block_trace=True)`: a model compiled whole traces each kind of MoE block once
(torch.compiler.nested_compile_region), and equals eager in outputs and gradients over new sequence lengths."""

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import graph_moe
from graph_moe import shared_trace
from helpers import Keep, assert_close_bf16, assert_grads_close, split_stacked
from tiny_models import build


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                            init_lora_weights=False))


@pytest.mark.parametrize("experts", ["frozen", "lora"])
def test_whole_model_compile_traces_each_block_kind_once(experts):
    model = build("qwen3_moe", layers=4)
    for layer in model.model.layers:
        layer.mlp.experts.requires_grad_(False)
    if experts == "lora":
        model = _lora(model)
    reference = copy.deepcopy(model)
    graph_moe.install(model, shared_block_trace=True)
    keep = Keep()
    compiled = torch.compile(model, backend=graph_moe.make_backend(keep))
    graphs_before = counters["stats"]["unique_graphs"]
    for length in (6, 9, 13):  # the second length recompiles with dynamic shapes, the third reuses it
        ids = torch.randint(0, 64, (2, length))
        with graph_moe.capture_settings():
            out = compiled(input_ids=ids, labels=ids, use_cache=False)
        ref = reference(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward(), ref.loss.backward()
        assert_close_bf16(out.logits, ref.logits, f"logits at {length}")
        grads = split_stacked({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert_grads_close(grads, {n: p.grad for n, p in reference.named_parameters() if p.grad is not None})
        model.zero_grad(), reference.zero_grad()
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    assert graphs == 2
    found = counters["graph_moe"]["loops_found"]
    assert found == counters["graph_moe"]["loops_rewritten"] and counters["graph_moe"]["loops_skipped"] == 0
    if experts == "frozen":  # the shared block's subgraph holds the loop: one per graph, where four were traced
        assert found == graphs and keep.count("invoke_subgraph") == 4 * graphs
    else:  # Under PEFT the first layer's input needs no gradient (frozen embeddings, LoRA on the experts only): that
        # layer gets a subgraph of its own (which torch inlines, being used once), layers 1-3 share the other
        assert found < 4 * graphs and keep.count("invoke_subgraph") >= 3 * graphs


def test_graph_moe_compile_regions_call_the_plain_forward():
    """graph_moe.compile's regions are one decoder layer each: no nested region there, expert 0's body traced alone."""
    model = build("qwen3_moe", layers=2)
    for layer in model.model.layers:
        layer.mlp.experts.requires_grad_(False)
    reference = copy.deepcopy(model)
    graph_moe.install(model, shared_block_trace=True)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 7))
    assert_close_bf16(model(input_ids=ids, use_cache=False).logits, reference(input_ids=ids, use_cache=False).logits)
    assert keep.count("invoke_subgraph") == 0 and counters["graph_moe"]["loops_traced_once"] >= 1
    assert graph_moe.install(model).blocks[0].status == "already installed"  # and back to the plain forward
    assert "graph_moe_forward" not in vars(model.model.layers[0].mlp.forward.__func__)


def _qlora_factory(tmp_path):
    """A function making QLoRA models (bitsandbytes NF4 experts + LoRA) of one saved Qwen3-MoE."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from graph_moe.tools.model_zoo import build_model

    # hidden and intermediate multiples of the 4-bit block size (64): the CPU lays out whole blocks only
    build_model("qwen3_moe", layers=4, experts=4, top_k=2, hidden=64, intermediate=128, vocab=64, seed=1
                ).save_pretrained(tmp_path)
    quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    def qlora():
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": "cpu"})
        torch.manual_seed(0)
        return get_peft_model(model.train(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules=["gate_proj", "up_proj", "down_proj"]))
    return qlora


@pytest.mark.skipif(not shared_trace.TAKES_4BIT, reason="this torch's Dynamo fails on a shared trace of 4-bit experts")
def test_4bit_experts_with_lora_share_the_trace(tmp_path):
    """QLoRA (bitsandbytes NF4 experts + LoRA), compiled whole: with the shared trace, the loss and LoRA gradients of
    the plain whole-model compile (and eager's loss), with fewer loops traced."""
    qlora = _qlora_factory(tmp_path)
    reference, runs = qlora(), {}
    for shared in (True, False):
        torch._dynamo.reset()  # PEFT's forward is one code object for both models: no compiled code shared
        counters.clear()
        model = qlora()
        report = graph_moe.install(model, shared_block_trace=shared)
        assert all(b.weights.startswith("grouped layout") for b in report.blocks)
        keep = Keep()
        compiled = torch.compile(model, backend=graph_moe.make_backend(keep))
        torch.manual_seed(1)
        for length in (6, 9):
            ids = torch.randint(0, 64, (2, length))
            with graph_moe.capture_settings():
                loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if shared:
                assert_close_bf16(loss, reference(input_ids=ids, labels=ids, use_cache=False).loss, f"loss {length}")
        runs[shared] = ({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        counters["graph_moe"]["loops_rewritten"], keep.count("invoke_subgraph"))
    (grads, loops, calls), (plain_grads, plain_loops, plain_calls) = runs[True], runs[False]
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], msg=lambda m: f"{name}: {m}")
    # layer 0 (whose input needs no gradient) has a subgraph of its own, layers 1-3 share one: the pass sees 3 loops a
    # graph (layer 0's inlined, its unused subgraph, the shared one) where the plain compile has 4
    assert plain_calls == 0 and calls >= 3 * 2 and loops < plain_loops == 4 * 2


def test_a_whole_model_graph_says_how_to_compile_faster(caplog):
    """Several MoE blocks traced expert by expert into one graph: an INFO line names the faster ways; none under
    graph_moe.compile (one decoder layer a graph) or with the shared block trace."""
    ids = torch.randint(0, 64, (2, 6))
    for way in ("backend", "backend, shared block trace", "graph_moe.compile"):
        torch._dynamo.reset()
        model = build("qwen3_moe", layers=2)
        if way.startswith("backend"):
            graph_moe.install(model, shared_block_trace=way.endswith("trace"))
            compiled = torch.compile(model, backend=graph_moe.make_backend("aot_eager"))
        else:
            compiled = graph_moe.compile(model, inner="aot_eager")
        caplog.clear()
        with caplog.at_level("INFO", logger="graph_moe"), graph_moe.capture_settings():
            compiled(input_ids=ids, use_cache=False)
        said = "shared_block_trace=True" in caplog.text
        assert said == (way == "backend"), way


def test_4bit_experts_left_out_of_the_shared_trace_where_dynamo_fails(tmp_path, monkeypatch, caplog):
    """Under a torch whose Dynamo fails on the shared trace of 4-bit experts (torch 2.11: "KeyError: example_value"),
    install leaves those blocks' forward plain, says so, and the model compiled whole equals eager."""
    monkeypatch.setattr(shared_trace, "TAKES_4BIT", False)
    qlora = _qlora_factory(tmp_path)
    model, reference = qlora(), qlora()
    with caplog.at_level(logging.WARNING, logger="graph_moe"):
        graph_moe.install(model, shared_block_trace=True)
    assert "shared_block_trace left out 4 block(s) with 4-bit experts" in caplog.text
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert blocks and all("graph_moe_forward" not in vars(b.forward.__func__) for b in blocks)
    keep = Keep()
    compiled = torch.compile(model, backend=graph_moe.make_backend(keep))
    ids = torch.randint(0, 64, (2, 6))
    with graph_moe.capture_settings():
        loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    assert_close_bf16(loss, reference(input_ids=ids, labels=ids, use_cache=False).loss)
    assert keep.count("invoke_subgraph") == 0 and counters["graph_moe"]["loops_rewritten"] == 4

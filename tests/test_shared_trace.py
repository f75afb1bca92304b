"""`graph_moe.install(model, shared_block_trace=True)`: a model compiled whole traces each kind of MoE block once
(torch.compiler.nested_compile_region), and equals eager in outputs and gradients over new sequence lengths."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import graph_moe
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

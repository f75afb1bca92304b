"""`generate()` on a model compiled by `graph_moe.compile`: eager's tokens, and a number of compiled graphs that does
not grow with the layers (a layer called with a KV cache runs its attention eagerly, its MoE block compiled alone)."""

import copy
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import graph_moe
from tiny_models import build


def _generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


def test_generating_with_trainable_experts_says_they_are_stacked_per_step(caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["graph_moe.compile"], "_warned_stacked_per_step", False)  # said once a process
    model = build("qwen3_moe", dtype=torch.float32).eval()  # as loaded: every weight requires grad
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    ids = torch.randint(1, 64, (2, 4))
    with caplog.at_level("WARNING", logger="graph_moe"):
        torch.testing.assert_close(_generate(model, ids), _generate(reference, ids), rtol=0, atol=0)
    assert "call model.requires_grad_(False) before graph_moe.compile" in caplog.text


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
def test_generate_gives_eager_tokens_with_graphs_independent_of_depth(family):
    graphs = {}
    for layers in (2, 6):
        torch._dynamo.reset()
        counters.clear()
        model = build(family, layers=layers, dtype=torch.float32, seed=layers).eval().requires_grad_(False)
        reference = copy.deepcopy(model)
        graph_moe.compile(model, inner="aot_eager")
        ids = torch.randint(1, 64, (3, 5))
        torch.testing.assert_close(_generate(model, ids), _generate(reference, ids), rtol=0, atol=0)
        graphs[layers] = counters["stats"]["unique_graphs"]
        assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
        assert counters["graph_moe"]["weight_stacks_per_forward"] == 0  # frozen: laid out once, no copy per token
        # a second prompt of another length compiles nothing more
        _generate(model, torch.randint(1, 64, (3, 9)))
        assert counters["stats"]["unique_graphs"] == graphs[layers]
    assert graphs[2] == graphs[6] <= 2  # one prefill graph and one decode graph at most


def _compiled_for_training(layers):
    """A bf16 model compiled by graph_moe (counters and Dynamo's caches cleared), its eager twin, and token ids."""
    counters.clear()
    torch._dynamo.reset()
    model = build("qwen3_moe", layers=layers)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    return model, reference, torch.randint(0, 64, (2, 8))


def test_a_training_call_with_a_cache_compiles_the_layer_and_says_so(caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["graph_moe.compile"], "_warned_training_with_cache", False)  # said once a process
    model, reference, ids = _compiled_for_training(layers=1)
    with caplog.at_level("WARNING", logger="graph_moe"):
        loss = model(input_ids=ids, labels=ids).loss  # use_cache: the config's default, True
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids).loss, rtol=2e-2, atol=2e-2)
    assert "pass use_cache=False" in caplog.text
    assert counters["stats"]["unique_graphs"] == 1 and counters["graph_moe"]["loops_rewritten"] == 1


def test_training_calls_still_compile_the_whole_layer():
    model, reference, ids = _compiled_for_training(layers=2)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss, reference(input_ids=ids, labels=ids, use_cache=False).loss, rtol=2e-2, atol=2e-2)
    # the attention is inside the compiled graph: more than the MoE block's ops
    assert counters["stats"]["unique_graphs"] == 1 and counters["graph_moe"]["loops_rewritten"] == 1
    # after generation, training calls still take the layer's compiled graph
    model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)
    before = counters["stats"]["unique_graphs"]
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert counters["stats"]["unique_graphs"] == before

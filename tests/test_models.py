"""transformers 4.57 MoE models: graph_moe.compile rewrites every MoE layer, logits and gradients equal eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import graph_moe
from helpers import assert_close_bf16
from tiny_models import FAMILIES, build


class Keep:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, **kw):
        self.graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def count(self, name):
        return sum(1 for g in self.graphs for n in g.graph.nodes if getattr(n.target, "__name__", n.target) == name)


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("regional", [True, False], ids=["regional", "whole"])
def test_model_rewritten_and_equal(family, regional):
    model = build(family)
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep, regional=regional)
    assert model._graph_moe_install_report.num_installed == 2

    ids = torch.randint(0, 64, (2, 7))
    ref_logits, ref_grads = _loss_and_grads(reference, ids)
    logits, grads = _loss_and_grads(model, ids)

    expected = 1 if regional else 2  # regional: both layers reuse one compiled graph
    assert counters["graph_moe"]["loops_rewritten"] == expected
    assert counters["graph_moe"]["loops_skipped"] == 0
    assert keep.count("_grouped_mm") == 2 * expected and keep.count("index_add_") == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_bf16(grads[name], ref_grads[name], name)


def test_explain_reports_each_loop():
    model = build("qwen3_moe")
    explanation = graph_moe.explain(model, torch.randint(0, 64, (1, 5)))
    assert explanation.rewritten == 2 and len(explanation.loops) == 2
    text = str(explanation)
    assert "Qwen3MoeSparseMoeBlock" in text and "gate_proj+up_proj" in text and "2 of 2" in text
    assert not any(getattr(m, "_graph_moe_installed", None) for m in model.modules())  # restored


def test_backend_by_name_without_install_warns(caplog):
    model = build("qwen3_moe", layers=1)
    with caplog.at_level("WARNING", logger="graph_moe"):
        torch.compile(model, backend="graph_moe")(torch.randint(0, 64, (1, 5)))
    assert counters["graph_moe"]["loops_found"] == 0
    assert "graph_moe.install" in caplog.text


def test_compile_scopes_the_capture_settings():
    """graph_moe.compile applies the Dynamo capture settings around its own calls only."""
    model = build("olmoe", layers=1)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
        graph_moe.compile(model, inner="eager")
        model(input_ids=torch.randint(0, 64, (1, 5)), use_cache=False)
        assert counters["graph_moe"]["loops_rewritten"] == 1
        assert not torch._dynamo.config.capture_dynamic_output_shape_ops
        assert not torch._dynamo.config.capture_scalar_outputs

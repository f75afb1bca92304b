"""`generate()` on a transformers 5.x model compiled by `graph_moe.compile`, experts as loaded: eager's tokens, and as
many compiled graphs for 2 layers as for 6."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graph_moe  # noqa: E402
from tiny_models import build  # noqa: E402


def test_generate_gives_eager_tokens_with_graphs_independent_of_depth():
    graphs = {}
    for layers in (2, 6):
        torch._dynamo.reset()
        counters.clear()
        model = build("qwen3_moe", layers=layers, dtype=torch.float32, seed=layers).eval()
        reference = copy.deepcopy(model)
        graph_moe.compile(model, inner="aot_eager")
        ids = torch.randint(1, 64, (3, 5))
        got, want = (m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0) for m in (model, reference))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[2] == graphs[6] <= 2

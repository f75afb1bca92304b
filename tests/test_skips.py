"""Loops the pass cannot prove equivalent stay as traced, are counted as skipped, and say why."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers import Recorder, assert_close_bf16
from moe_blocks import RangeMoE


def _compile_and_compare(module, recorder, dtype=torch.bfloat16):
    x = torch.randn(2, 5, module.gate.in_features, dtype=dtype)
    out = torch.compile(module, backend=recorder.backend)(x)
    assert_close_bf16(out, module(x))
    return recorder.reports


def _assert_skipped(reports, *words):
    (report,) = reports
    assert not report.rewritten
    assert all(w in report.reason for w in words), report.reason
    assert "left as traced" in str(report)
    assert counters["graph_moe"]["loops_skipped"] == 1
    assert counters["graph_moe"]["loops_rewritten"] == 0


def test_heterogeneous_activation_is_left_alone():
    torch.manual_seed(0)
    module = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
    module.experts[2].act = F.gelu
    rec = Recorder()
    reports = _compile_and_compare(module, rec)
    _assert_skipped(reports, "expert 2", "differs")
    assert rec.count("index_add_") == 4 and rec.count("_grouped_mm") == 0


def test_heterogeneous_size_is_left_alone():
    torch.manual_seed(0)
    module = RangeMoE(num_experts=3, top_k=2).to(torch.bfloat16)
    module.experts[1].up_proj = torch.nn.Linear(16, 24, bias=False).to(torch.bfloat16)
    module.experts[1].gate_proj = torch.nn.Linear(16, 24, bias=False).to(torch.bfloat16)
    module.experts[1].down_proj = torch.nn.Linear(24, 16, bias=False).to(torch.bfloat16)
    _assert_skipped(_compile_and_compare(module, Recorder()), "expert 1", "differs")


class _ReadsNeighbour(torch.nn.Module):
    def __init__(self, expert, neighbour):
        super().__init__()
        self.expert, self.neighbour = expert, neighbour

    def forward(self, x):
        return self.expert(x) + F.linear(x, self.neighbour.up_proj.weight[:16])


def test_body_reading_another_experts_weight_is_left_alone():
    torch.manual_seed(0)
    module = RangeMoE(num_experts=3, top_k=2, hidden=16, inter=16).to(torch.bfloat16)
    module.experts[1] = _ReadsNeighbour(module.experts[1], module.experts[0])
    _assert_skipped(_compile_and_compare(module, Recorder()), "expert")


def test_value_used_outside_the_loop_is_left_alone():
    class Leaky(RangeMoE):
        def forward(self, hidden_states):
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            w = F.softmax(self.gate(flat), dim=1, dtype=torch.float)
            w, sel = torch.topk(w, self.top_k, dim=-1)
            w = w.to(flat.dtype)
            final = torch.zeros_like(flat)
            mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
            extra = torch.zeros((), dtype=flat.dtype)
            for e in range(self.num_experts):
                idx, top_x = torch.where(mask[e])
                cur = self.experts[e](flat[None, top_x].reshape(-1, flat.shape[-1]))
                extra = extra + cur.float().pow(2).mean().to(flat.dtype)  # an aux value from every expert
                final.index_add_(0, top_x, (cur * w[top_x, idx, None]).to(flat.dtype))
            return final.reshape(hidden_states.shape) + extra

    torch.manual_seed(0)
    module = Leaky(num_experts=3, top_k=2).to(torch.bfloat16)
    _assert_skipped(_compile_and_compare(module, Recorder()), "outside the loop")


class _After(torch.nn.Module):
    def __init__(self, expert, then):
        super().__init__()
        self.expert, self.then = expert, then

    def forward(self, x):
        return self.then(self.expert(x))


def test_reduction_across_rows_is_left_alone():
    torch.manual_seed(0)
    module = RangeMoE(num_experts=3, top_k=2).to(torch.bfloat16)
    module.experts = torch.nn.ModuleList(_After(e, lambda h: h - h.mean(0, keepdim=True)) for e in module.experts)
    _assert_skipped(_compile_and_compare(module, Recorder()), "works across rows")


def test_a_random_value_drawn_per_expert_is_left_alone():
    """The same call in every iteration, but each draws its own value: not one computation."""
    torch.manual_seed(0)
    module = RangeMoE(num_experts=3, top_k=2).to(torch.bfloat16)
    module.experts = torch.nn.ModuleList(_After(e, lambda h: h * torch.rand((), dtype=h.dtype)) for e in module.experts)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    torch.compile(module, backend=(rec := Recorder()).backend)(x)  # random: nothing to compare with eager
    _assert_skipped(rec.reports, "different outside values")

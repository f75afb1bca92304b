"""The core pass on synthetic range-loop blocks: rewritten, and equal to eager forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers import Recorder, assert_close_bf16, grads
from moe_blocks import RangeMoE, TwoBlocks

VARIANTS = [
    dict(num_experts=1, top_k=1),
    dict(num_experts=4, top_k=2),
    dict(num_experts=4, top_k=4),
    dict(num_experts=8, top_k=3, gated=False, act="gelu"),
    dict(num_experts=8, top_k=2, bias=True),
    dict(num_experts=6, top_k=1, act="relu", norm_topk_prob=False),
    dict(num_experts=32, top_k=4, act="tanh", hidden=8, inter=16),
]


def _run(module, x, recorder):
    compiled = torch.compile(module, backend=recorder.backend)
    x_ref = x.clone().requires_grad_()
    ref = module(x_ref)
    seed = torch.randn_like(ref)
    ref.backward(seed)
    ref_grads = grads(module, x_ref)
    module.zero_grad()
    x_c = x.clone().requires_grad_()
    out = compiled(x_c)
    out.backward(seed)
    return ref, out, ref_grads, grads(module, x_c)


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_variant_matches_eager(cfg):
    torch.manual_seed(len(str(cfg)))
    module = RangeMoE(**cfg).to(torch.bfloat16)
    x = torch.randn(3, 5, module.gate.in_features, dtype=torch.bfloat16)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, x, rec)

    assert [r.rewritten for r in rec.reports] == [True], [str(r) for r in rec.reports]
    assert rec.count("_grouped_mm") == (2 if cfg.get("gated", True) else 2)
    assert rec.count("index_add_", "index_add") == 0
    assert rec.count("where", "nonzero") == 0
    assert_close_bf16(out, ref, "output")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_bf16(a, b, f"grad {i}")
    assert counters["graph_moe"]["loops_rewritten"] == 1


def test_fused_gate_up_and_report():
    torch.manual_seed(0)
    module = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
    rec = Recorder()
    torch.compile(module, backend=rec.backend)(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    (report,) = rec.reports
    assert report.projections == ["gate_proj+up_proj", "down_proj"]
    assert "grouped GEMMs" in str(report)


def test_unfused_projections_when_asked():
    torch.manual_seed(0)
    module = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
    rec = Recorder(fuse_projections=False)
    torch.compile(module, backend=rec.backend)(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert rec.count("_grouped_mm") == 3


def test_two_blocks_in_one_graph():
    torch.manual_seed(1)
    module = TwoBlocks(num_experts=4, top_k=2).to(torch.bfloat16)
    x = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, x, rec)
    assert len(rec.graphs) == 1
    assert [r.rewritten for r in rec.reports] == [True, True]
    assert rec.count("_grouped_mm") == 4 and rec.count("index_add_") == 0
    assert_close_bf16(out, ref)
    for a, b in zip(out_grads, ref_grads):
        assert_close_bf16(a, b)


def test_second_sequence_length_is_rewritten_too():
    torch.manual_seed(2)
    module = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
    rec = Recorder()
    compiled = torch.compile(module, backend=rec.backend)
    for seq in (3, 5, 7, 9):
        x = torch.randn(2, seq, 16, dtype=torch.bfloat16)
        assert_close_bf16(compiled(x), module(x))
    assert len(rec.graphs) == 2  # static, then dynamic
    assert all(r.rewritten for r in rec.reports) and len(rec.reports) == 2
    dynamic_inputs = [n for n in rec.graphs[1].graph.nodes if n.op == "placeholder"
                      and isinstance(n.meta.get("example_value"), torch.SymInt)]
    assert dynamic_inputs, "the second graph should be dynamic"


def test_routing_changes_never_recompile():
    torch.manual_seed(3)
    module = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
    rec = Recorder()
    compiled = torch.compile(module, backend=rec.backend)
    for _ in range(4):  # fresh inputs route differently; all tokens on one expert included
        x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
        assert_close_bf16(compiled(x), module(x))
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.weight[0] = 10.0  # expert 0 wins for every positive-sum token
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16).abs()
    assert_close_bf16(compiled(x), module(x))
    assert len(rec.graphs) == 1


def test_inductor_end_to_end():
    torch.manual_seed(4)
    module = RangeMoE(num_experts=4, top_k=2, hidden=16, inter=32).to(torch.bfloat16)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    rec = Recorder(inner="inductor")
    ref, out, ref_grads, out_grads = _run(module, x, rec)
    assert all(r.rewritten for r in rec.reports)
    assert rec.count("_grouped_mm") == 2
    assert_close_bf16(out, ref)
    for a, b in zip(out_grads, ref_grads):
        assert_close_bf16(a, b)


def test_dynamic_weight_shapes_after_another_block_size():
    """A second block size recompiles with symbolic weight shapes; Dynamo then reads sizes once per expert."""
    rec = Recorder()
    for hidden, inter, seq in ((16, 32, 4), (16, 32, 6), (8, 24, 4)):
        torch.manual_seed(hidden + inter)
        module = RangeMoE(num_experts=4, top_k=2, hidden=hidden, inter=inter).to(torch.bfloat16)
        x = torch.randn(2, seq, hidden, dtype=torch.bfloat16)
        assert_close_bf16(torch.compile(module, backend=rec.backend)(x), module(x))
    assert len(rec.reports) == 3 and all(r.rewritten for r in rec.reports), [str(r) for r in rec.reports]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_use_the_fallback_op(dtype):
    torch.manual_seed(5)
    module = RangeMoE(num_experts=4, top_k=2, bias=True).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, x, rec)
    (report,) = rec.reports
    assert report.rewritten and "graph_moe::grouped_mm" in str(report)
    assert rec.count("_grouped_mm") == 0 and rec.count("index_add_") == 0
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(out_grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_dynamic_true_reads_sizes_at_an_index_equal_to_the_expert():
    """Under dynamic=True every expert re-reads x.shape[-1] (a getitem at index 1 of a size tuple); at expert 1
    that is not a stack[e] slice. An installed Qwen3-MoE block reads it so."""
    import graph_moe
    from tiny_models import build

    block = build("qwen3_moe", layers=1).model.layers[0].mlp
    graph_moe.install(block)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    rec = Recorder()
    compiled = torch.compile(block, backend=rec.backend, dynamic=True)
    with graph_moe.capture_settings():
        out = compiled(x)[0]
    assert [r.rewritten for r in rec.reports] == [True], [str(r) for r in rec.reports]
    assert_close_bf16(out, block(x)[0], "output")


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "frozen"])
def test_expert_groups_start_on_16_byte_boundaries(trained):
    """torch._grouped_mm on CUDA needs each group along a contiguous grouped dimension 16-byte aligned, in whatever
    layout Inductor picks for the rows or their gradients: with trained expert weights (weight-gradient GEMMs
    grouped along the rows) the rewrite pads every expert's rows to a multiple of 8 (bf16), the padding rows are
    dropped in the combine, and output and gradients still equal eager. Frozen experts are not padded."""
    torch.manual_seed(3)
    module = RangeMoE(num_experts=8, top_k=3).to(torch.bfloat16)
    module.experts.requires_grad_(trained)
    x = torch.randn(1, 7, module.gate.in_features, dtype=torch.bfloat16)  # 21 rows: groups of odd sizes
    calls = []

    class Watch(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if getattr(target, "__name__", None) == "_grouped_mm":
                calls.append((args[0].shape[0], kwargs["offs"].tolist()))
            return super().call_function(target, args, kwargs)

    rec = Recorder(inner=lambda gm, example_inputs, **kw: lambda *args: Watch(gm).run(*args))
    ref, out, ref_grads, out_grads = _run(module, x, rec)
    assert [r.rewritten for r in rec.reports] == [True], [str(r) for r in rec.reports]
    assert len(calls) == 2, calls
    for rows, offs in calls:
        assert offs[-1] == rows and offs == sorted(offs), (rows, offs)
        if trained:
            assert rows % 8 == 0 and rows >= 21 and all(o % 8 == 0 for o in offs), (rows, offs)
        else:
            assert rows == 21, (rows, offs)
    assert_close_bf16(out, ref, "output")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_bf16(a, b, f"grad {i}")


def test_stacked_expert_weights_are_not_saved_for_backward():
    """Per-expert weights the pass stacks (no grouped layout: trained experts, FSDP2 shards) are stacked again in
    the backward, not kept from the forward: saving the stack would hold a second copy of every layer's expert
    weights until the backward. Gradients still equal eager."""
    torch.manual_seed(5)
    module = RangeMoE(num_experts=8, top_k=2, hidden=16, inter=32).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, x, rec)  # compiles
    assert [r.rewritten for r in rec.reports] == [True], [str(r) for r in rec.reports]
    for a, b in zip(out_grads, ref_grads):
        assert_close_bf16(a, b, "grad")

    compiled = torch.compile(module, backend=rec.backend)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        compiled(x.clone().requires_grad_()).sum().backward()
    stacks = {(8, 64, 16), (8, 16, 64), (8, 16, 32), (8, 32, 16)}  # gate+up (E, 2I, H), down (E, H, I), transposed
    assert saved and not stacks & set(saved), saved


class _SharedNormAfter(torch.nn.Module):
    """An expert followed by a norm module every expert shares (MuseSpark's post-expert norm): a hand-written
    RMSNorm, `x.pow(2).mean(-1)` per row, scaled by `(1 + weight)`, which each iteration recomputes."""

    def __init__(self, expert, norm_weight):
        super().__init__()
        self.expert, self.norm_weight = expert, norm_weight

    def forward(self, x):
        h = self.expert(x).float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.norm_weight).float()).to(x.dtype)


def test_per_row_reductions_and_recomputed_shared_values_are_grouped():
    torch.manual_seed(11)
    module = RangeMoE(num_experts=6, top_k=2).to(torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16) * 0.1)
    module.experts = torch.nn.ModuleList(_SharedNormAfter(e, weight) for e in module.experts)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, x, rec)
    assert [r.rewritten for r in rec.reports] == [True], [str(r) for r in rec.reports]
    assert rec.count("_grouped_mm") == 2 and rec.count("index_add_", "index_add") == 0
    assert_close_bf16(out, ref, "output")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_bf16(a, b, f"grad {i}")


class _CastSlices(torch.nn.Module):
    """3-D expert weights, each expert's slice cast to fp32 in the loop (transformers 5.x privacy filter's form)."""

    def __init__(self, num_experts=4, top_k=2, hidden=16, inter=32, cast_of_expert=lambda w, e: w.float()):
        super().__init__()
        self.num_experts, self.top_k, self.cast_of_expert = num_experts, top_k, cast_of_expert
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.up = torch.nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.1)
        self.down = torch.nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.1)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, sel = torch.topk(F.softmax(self.gate(flat), dim=-1, dtype=torch.float), self.top_k, dim=-1)
        final = torch.zeros(flat.shape, dtype=torch.float32)
        mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            h = F.silu(F.linear(flat[top_x].float(), self.cast_of_expert(self.up[e], e)))
            h = F.linear(h, self.cast_of_expert(self.down[e], e)) * w[top_x, idx, None]
            final.index_add_(0, top_x, h)
        return final.to(x.dtype).reshape(x.shape)


def test_casts_of_each_experts_slice_group_as_one_cast_stack():
    torch.manual_seed(12)
    module = _CastSlices().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    rec = Recorder()
    ref, out, ref_grads, out_grads = _run(module, x, rec)
    assert [r.rewritten for r in rec.reports] == [True], [str(r) for r in rec.reports]
    assert rec.count("grouped_mm") == 2 and rec.count("index_add_", "index_add") == 0  # fp32: the fallback op
    assert_close_bf16(out, ref, "output")
    for i, (a, b) in enumerate(zip(out_grads, ref_grads)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_bf16(a, b, f"grad {i}")


def test_experts_casting_their_slices_differently_are_left_alone():
    torch.manual_seed(12)
    module = _CastSlices(cast_of_expert=lambda w, e: w.float() if e != 2 else w.double().float()).to(torch.bfloat16)
    rec = Recorder()
    torch.compile(module, backend=rec.backend)(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert [r.rewritten for r in rec.reports] == [False], [str(r) for r in rec.reports]

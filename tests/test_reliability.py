"""Reliability: every loop the pass meets is either rewritten and equal to eager (forward and gradients),
or left as traced, equal to eager, and reported with the block and the cause. Never a wrong answer, never a
crash in the user's torch.compile.

Odd sizes, empty and one-token batches, idle experts, more experts than one CUDA grouped GEMM takes, other
dtypes, autocast, MoE look-alikes (heterogeneous, shared or borrowed weights, hooks, experts on other devices, two
accumulators), train/eval, frozen experts, no_grad/inference_mode, weights changed after compiling, a
property-based sweep over random block configurations (dtype included), and the messages: every loop left as
traced names its block, its cause and what to do.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import pathlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from graph_moe.kernels import grouped_chunks
from graph_moe.passes.ops import example_value, source_name
from graph_moe.passes import report as pass_report
from graph_moe.passes.report import GENERIC_HINT, hint_for
from graph_moe.report import reset_counters
from helpers import Recorder
from moe_blocks import ACTIVATIONS, Expert, RangeMoE

BF16 = torch.bfloat16
TOL = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.float32: dict(atol=1e-5, rtol=1e-5)}


# ----------------------------------------------------------------------------------------------------------
# helpers


def _close(a, b, what, tol):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{what}: {m}")


def _param_grads(module):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def check_against_eager(module, x, rec, *, ctx=contextlib.nullcontext, backward=True, tol=None):
    """Run eager and compiled (fresh input copies, same output seed); compare output, every parameter
    gradient (None where eager has None) and the input gradient. Returns the compiled output."""
    tol = tol or TOL[x.dtype if x.dtype in TOL else BF16]
    compiled = torch.compile(module, backend=rec.backend)
    x_ref, x_c = (x.clone().requires_grad_(backward) for _ in range(2))
    module.zero_grad(set_to_none=True)
    with ctx():
        ref = module(x_ref)
    if backward:
        seed = torch.randn_like(ref)
        ref.backward(seed)
    ref_grads, ref_gx = _param_grads(module), x_ref.grad
    module.zero_grad(set_to_none=True)
    with ctx():
        out = compiled(x_c)
    assert out.dtype == ref.dtype, f"output dtype {out.dtype} vs eager {ref.dtype}"
    _close(out, ref, "output", tol)
    if backward:
        out.backward(seed)
        out_grads = _param_grads(module)
        for name, g in ref_grads.items():
            assert (g is None) == (out_grads[name] is None), f"{name}: eager grad {g is not None}, compiled " \
                                                             f"{out_grads[name] is not None}"
            if g is not None:
                _close(out_grads[name], g, f"grad of {name}", tol)
        _close(x_c.grad, ref_gx, "input grad", tol)
    module.zero_grad(set_to_none=True)
    return out


def assert_reason_and_hint(report):
    """A loop left as traced says why and what the user can do: a hint written for its reason, not the catch-all."""
    assert not report.rewritten
    assert report.reason.strip(), f"skipped without a reason: {report}"
    assert report.hint.strip() and report.hint != GENERIC_HINT, f"no hint written for this reason: {report.reason}"
    assert f"left as traced: {report.reason} (hint: {report.hint})" in str(report), str(report)


def assert_each_loop_accounted(reports, block=None):
    """Rewritten, or left as traced with a reason that the printed report carries."""
    assert reports, "no loop was found"
    for r in reports:
        if block is not None:
            assert r.block == block and str(r).startswith(f"{block}: "), str(r)
        if r.rewritten:
            assert r.projections and not r.reason, str(r)
        else:
            assert_reason_and_hint(r)
    found = counters["graph_moe"]["loops_found"]
    assert found == len(reports)
    assert counters["graph_moe"]["loops_rewritten"] == sum(r.rewritten for r in reports)


def assert_rewritten(rec, n=1):
    assert [r.rewritten for r in rec.reports] == [True] * n, [str(r) for r in rec.reports]
    assert rec.count("index_add_", "index_add") == 0 and rec.count("where", "nonzero") == 0


def assert_left_alone(rec, num_experts, *words):
    (report,) = rec.reports
    assert not report.rewritten, str(report)
    assert_reason_and_hint(report)
    assert all(w in report.reason for w in words), report.reason
    assert rec.count("_grouped_mm", "grouped_mm") == 0
    assert rec.count("index_add_") == num_experts  # exactly as traced
    assert counters["graph_moe"]["loops_skipped"] == 1


class Layer(nn.Module):
    """Puts a block at `layers.0.mlp`, as in a decoder, so reports carry a module path."""

    def __init__(self, block):
        super().__init__()
        self.mlp = block

    def forward(self, x):
        return self.mlp(x) + x


class Model(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.layers = nn.ModuleList([Layer(block)])

    def forward(self, x):
        return self.layers[0](x)


BLOCK = "layers.0.mlp"


def _block(seed=0, dtype=BF16, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_experts", 4)
    kw.setdefault("top_k", 2)
    return RangeMoE(**kw).to(dtype)


def _x(*shape, dtype=BF16, seed=100):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("hidden,inter,bias", [(12, 20, False), (16, 20, True)], ids=["h12-i20", "h16-i20-bias"])
def test_sizes_not_multiple_of_8(hidden, inter, bias):
    """Rows that are not 16-byte units: the graph_moe::grouped_mm fallback (or a reasoned skip), equal to eager."""
    module = _block(hidden=hidden, inter=inter, bias=bias)
    rec = Recorder()
    check_against_eager(module, _x(2, 5, hidden), rec)
    assert_each_loop_accounted(rec.reports)
    (report,) = rec.reports
    if report.rewritten:
        assert rec.count("grouped_mm") >= 1, "an unaligned GEMM must take the fallback op"
        assert "graph_moe::grouped_mm" in str(report)
        assert rec.count("index_add_") == 0


def test_fallback_note_counts_the_gemms_actually_emitted():
    """hidden 16, inter 20: the fused gate+up weight (E, 40, 16) is aligned and runs as torch._grouped_mm, only
    down_proj takes the fallback; the report must not claim every projection is on the slow op (it used to
    say '3 of 3', counted per unfused linear)."""
    module = _block(hidden=16, inter=20)
    rec = Recorder()
    check_against_eager(module, _x(2, 5, 16), rec)
    (report,) = rec.reports
    fast, slow = rec.count("_grouped_mm"), rec.count("grouped_mm")
    assert (fast, slow) == (1, 1)
    assert f"{slow} of {fast + slow} as graph_moe::grouped_mm" in str(report), str(report)


@pytest.mark.parametrize("cfg", [dict(num_experts=3, top_k=3), dict(num_experts=1, top_k=1, dtype=torch.float32)],
                         ids=["top_k-equals-E", "one-expert-fp32"])
def test_top_k_equal_to_E_and_one_expert(cfg):
    module = _block(seed=1, **cfg)
    dtype = cfg.get("dtype", BF16)
    rec = Recorder()
    check_against_eager(module, _x(2, 4, 16, dtype=dtype), rec)
    assert_rewritten(rec)
    assert rec.reports[0].top_k == cfg["top_k"] and rec.reports[0].num_experts == cfg["num_experts"]


def test_one_token():
    module = _block(seed=2)
    rec = Recorder()
    check_against_eager(module, _x(1, 1, 16), rec)
    assert_rewritten(rec)


def test_empty_batch_does_not_crash():
    """Regression: 0 tokens give torch.where a static row count, and prove() raised AttributeError (reading
    .node of an int) inside the user's torch.compile."""
    module = _block(seed=3)
    rec = Recorder()
    out = check_against_eager(module, _x(1, 0, 16), rec)
    assert out.shape == (1, 0, 16)
    assert_each_loop_accounted(rec.reports)


@pytest.mark.parametrize("top_k", [1, 2])
def test_idle_experts_and_every_token_on_one_expert(top_k):
    """The router sends every token to expert 2 (and, for top-2, its second slot to expert 0): the other
    experts get no rows, their gradients are zeros, as in eager."""
    module = _block(seed=4, top_k=top_k)
    with torch.no_grad():
        module.gate.weight.zero_()
        module.gate.weight[2] = 1.0
        module.gate.weight[0] = 0.5
    x = _x(2, 5, 16).abs()  # positive rows: expert 2 wins every token, expert 0 comes second
    with torch.no_grad():
        routed = torch.topk(module.gate(x.reshape(-1, 16)), top_k).indices
    assert set(routed.flatten().tolist()) == ({2} if top_k == 1 else {2, 0})
    rec = Recorder()
    check_against_eager(module, x, rec)
    assert_rewritten(rec)
    # once more for the idle experts' gradients: zeros, not missing
    compiled = torch.compile(module, backend=rec.backend)
    compiled(x).float().sum().backward()
    assert torch.count_nonzero(module.experts[1].up_proj.weight.grad) == 0
    assert torch.count_nonzero(module.experts[2].up_proj.weight.grad) > 0


# More experts than one grouped GEMM takes: the CUDA kernel of torch._grouped_mm refuses 1024 groups or more.


def test_group_limit_applies_to_cuda_rows_only():
    """The decision the pass takes for 1023, 1024 and 2048 experts, on fake CUDA tensors (no GPU needed): CUDA
    rows over 1023 experts are split into calls of 1023 experts; CPU rows never are."""
    with FakeTensorMode():
        for device in ("cuda", "cpu"):
            rows = torch.empty(64, 16, dtype=BF16, device=device)
            for experts in (1023, 1024, 2048):
                weights = torch.empty(experts, 32, 16, dtype=BF16, device=device)
                per_call = grouped_chunks.groups_per_call(rows, weights)
                assert per_call == (1023 if device == "cuda" and experts > 1023 else None), (device, experts)


class _NaNTail(torch.autograd.Function):
    """torch._grouped_mm as on CUDA: the rows past the last offset of the output, and of the input gradient,
    are uninitialized memory (here NaN)."""

    @staticmethod
    def forward(ctx, x, w_t, offs):
        ctx.save_for_backward(x, w_t, offs)
        out = _REAL_GROUPED_MM(x, w_t, offs=offs).clone()
        out[int(offs[-1]):] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w_t, offs = ctx.saved_tensors
        with torch.enable_grad():
            x_, w_ = x.detach().requires_grad_(), w_t.detach().requires_grad_()
            gx, gw = torch.autograd.grad(_REAL_GROUPED_MM(x_, w_, offs=offs), (x_, w_), grad)
        gx = gx.clone()
        gx[int(offs[-1]):] = float("nan")
        return gx, gw, None


_REAL_GROUPED_MM = torch._grouped_mm


@pytest.mark.parametrize("rows_per_expert", [[3, 0, 2, 5, 0, 0, 4, 1], [0] * 7 + [9], [9] + [0] * 7],
                         ids=["mixed", "last-expert-only", "first-expert-only"])
def test_grouped_gemm_in_chunks_equals_one_call(monkeypatch, rows_per_expert):
    """Calls of 3 experts over 8 experts (idle experts, whole idle calls): output and both gradients bit-equal to
    one torch._grouped_mm call, even when the kernel leaves NaN past its last offset."""
    torch.manual_seed(0)
    offs = torch.tensor(rows_per_expert).cumsum(0).to(torch.int32)
    x = torch.randn(int(offs[-1]), 16, dtype=BF16, requires_grad=True)
    w = torch.randn(8, 24, 16, dtype=BF16, requires_grad=True)
    seed = torch.randn(x.shape[0], 24, dtype=BF16)
    ref = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    ref_grads = torch.autograd.grad(ref, (x, w), seed)
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: _NaNTail.apply(a, b, offs))
    out = grouped_chunks.grouped_mm_in_chunks(x, w.transpose(-2, -1), offs, 3)
    grads = torch.autograd.grad(out, (x, w), seed)
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_loop_over_the_group_limit_is_split_and_equals_eager(monkeypatch):
    """The pass with the limit the CUDA kernel has, lowered to 3 experts a call and applied to CPU rows (the
    same constant the pass reads): 8 experts run as 3 calls per projection, equal to eager with every gradient."""
    monkeypatch.setattr(grouped_chunks, "MAX_GROUPS", {"cpu": 3})
    module = _block(seed=19, num_experts=8, top_k=2)
    rec = Recorder()
    check_against_eager(Model(module), _x(2, 7, 16), rec)
    assert_rewritten(rec)
    assert rec.count("grouped_mm_in_chunks") == 2 and rec.count("_grouped_mm") == 0
    assert "as 3 calls of at most 3 experts" in str(rec.reports[0]), str(rec.reports[0])


# ----------------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_and_float16_blocks(dtype):
    """Unaligned too (hidden 12): every GEMM on the fallback op, equal to eager at the dtype's precision."""
    module = _block(seed=5, dtype=dtype, num_experts=3, top_k=2, hidden=12, inter=20, bias=True)
    rec = Recorder()
    check_against_eager(module, _x(2, 5, 12, dtype=dtype), rec)
    assert_rewritten(rec)
    assert rec.count("_grouped_mm") == 0 and rec.count("grouped_mm") == 2
    assert "graph_moe::grouped_mm" in str(rec.reports[0])


class _Float32Router(nn.Linear):
    """A float32 router on bf16 hidden states (routers are often kept in float32)."""

    def forward(self, x):
        return super().forward(x.float())


def test_float32_router_bf16_experts():
    module = _block(seed=6)
    router = _Float32Router(16, 4, bias=False)
    router.weight.data.copy_(module.gate.weight.float())
    module.gate = router
    rec = Recorder()
    check_against_eager(module, _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports)
    assert rec.reports[0].rewritten and rec.count("_grouped_mm") == 2


def test_autocast_around_float32_block():
    module = _block(seed=7, dtype=torch.float32)
    rec = Recorder()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    check_against_eager(module, _x(2, 5, 16, dtype=torch.float32), rec, ctx=autocast, tol=TOL[BF16])
    assert_each_loop_accounted(rec.reports)
    if rec.reports[0].rewritten:
        assert rec.count("index_add_") == 0


# ----------------------------------------------------------------------------------------------------------
# models that look like MoE but are not one loop


def _other_size(module):
    module.experts[2] = Expert(16, 24).to(BF16)


def _other_activation(module):
    module.experts[1].act = F.relu


@pytest.mark.parametrize("change,words", [(_other_activation, ("expert 1", "relu")),
                                          (_other_size, ("expert 2", "shape"))], ids=["activation", "size"])
def test_heterogeneous_experts_are_left_alone(change, words):
    module = _block(seed=8)
    change(module)
    model = Model(module)
    rec = Recorder(inner="eager")
    check_against_eager(model, _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports, BLOCK)
    assert_left_alone(rec, 4, *words)


def test_weight_shared_by_two_experts_equals_eager():
    """Expert 1's up_proj.weight is expert 0's: one Parameter whose gradient sums both experts' uses."""
    module = _block(seed=9)
    module.experts[1].up_proj.weight = module.experts[0].up_proj.weight
    rec = Recorder(inner="eager")
    check_against_eager(Model(module), _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports, BLOCK)
    if not rec.reports[0].rewritten:
        assert rec.count("index_add_") == 4


def test_weight_shared_by_two_experts_is_named():
    """Regression: the reason blamed expert 2 ('outer value against leaf value')."""
    module = _block(seed=9)
    module.experts[1].up_proj.weight = module.experts[0].up_proj.weight
    rec = Recorder(inner="eager")
    torch.compile(module, backend=rec.backend)(_x(2, 5, 16))
    (report,) = rec.reports
    assert not report.rewritten
    # the cause is the weight experts 0 and 1 share; expert 2 is an ordinary expert
    assert "up_proj" in report.reason and "shared" in report.reason, report.reason
    assert_reason_and_hint(report)
    assert "expert 2" not in report.reason, report.reason


def test_weight_shared_by_every_expert_is_one_linear():
    """down_proj shared by all experts is an ordinary linear over all rows; the rest is grouped."""
    module = _block(seed=10)
    for e in module.experts[1:]:
        e.down_proj = module.experts[0].down_proj
    rec = Recorder()
    check_against_eager(module, _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports)
    if rec.reports[0].rewritten:
        assert rec.count("_grouped_mm") == 1 and rec.reports[0].projections == ["gate_proj+up_proj"]


class _RowsOfAStack(nn.Module):
    """Expert e's weights are rows e of two stacked parameters, the first with one row more than there are experts
    (a padding or "null" expert): stack[e] for every e is not the whole stack, so the pass stacks the E rows."""

    def __init__(self, hidden=16, inter=32, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts + 1, inter, hidden) / 4)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, inter) / 4)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, selected = torch.topk(F.softmax(self.gate(x), dim=1, dtype=torch.float), self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        final = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            out = F.linear(F.silu(F.linear(x[top_x], self.w_in[e])), self.w_out[e]) * weights[top_x, idx, None]
            final.index_add_(0, top_x, out)
        return final.reshape(shape)


def test_stack_with_more_rows_than_experts_equals_eager():
    """Regression: the rewrite stacked the experts' rows of w_in, then erased those rows' reads with the
    loop and crashed in the user's torch.compile. Now the reads stay, and output and gradients equal eager."""
    torch.manual_seed(11)
    module = Model(_RowsOfAStack().to(BF16))
    rec = Recorder(inner="eager")
    check_against_eager(module, _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports, BLOCK)
    assert rec.reports[0].rewritten and rec.count("index_add_") == 0
    assert counters["graph_moe"]["weight_stacks_per_forward"] == 1  # w_in's rows; w_out is taken whole


class _ReadsNeighbour(nn.Module):
    def __init__(self, expert, neighbour):
        super().__init__()
        self.expert, self.neighbour = expert, neighbour

    def forward(self, x):
        return self.expert(x) + self.neighbour.up_proj(x)


def _reads_neighbour(module):
    module.experts[2] = _ReadsNeighbour(module.experts[2], module.experts[0])
    return module


def test_body_reading_another_experts_parameters():
    module = _reads_neighbour(_block(seed=11, num_experts=3, inter=16))
    rec = Recorder(inner="eager")
    check_against_eager(Model(module), _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports, BLOCK)
    assert_left_alone(rec, 3)


def test_body_reading_another_experts_parameters_is_named():
    """Regression: the reason blamed expert 1 ('expert 1 differs from expert 0 ... outer value against leaf value')."""
    module = _reads_neighbour(_block(seed=11, num_experts=3, inter=16))
    rec = Recorder(inner="eager")
    torch.compile(module, backend=rec.backend)(_x(2, 5, 16))
    (report,) = rec.reports
    assert not report.rewritten
    # the cause is expert 2 reading expert 0's up_proj; expert 1 is an ordinary expert
    assert "up_proj" in report.reason and re.search(r"\b2\b", report.reason), report.reason
    assert_reason_and_hint(report)
    assert "expert 1" not in report.reason, report.reason


@pytest.mark.parametrize("where", ["expert", "projection", "pre", "every-expert"])
def test_forward_hook_registered_before_compiling(where):
    module = _block(seed=12)
    if where == "expert":
        module.experts[2].register_forward_hook(lambda m, i, out: out * 2)
    elif where == "projection":
        module.experts[1].down_proj.register_forward_hook(lambda m, i, out: out + 1)
    elif where == "pre":
        module.experts[3].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    else:
        for e in module.experts:
            e.register_forward_hook(lambda m, i, out: out * 2)
    rec = Recorder(inner="eager" if where != "every-expert" else "aot_eager")
    check_against_eager(Model(module), _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports, BLOCK)
    if where == "every-expert":
        assert_rewritten(rec)  # the same hook on every expert is part of the one computation
    else:
        hooked = {"expert": 2, "projection": 1, "pre": 3}[where]
        assert_left_alone(rec, 4, f"expert {hooked} differs")


class _TwoAccumulators(RangeMoE):
    """Each expert adds into `final` (scaled) and into `aux` (raw): two index_add_ chains sharing the bodies."""

    def forward(self, hidden_states):
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        w = F.softmax(self.gate(h), dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        w = w.to(h.dtype)
        final, aux = torch.zeros_like(h), torch.zeros_like(h)
        mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            out = self.experts[e](h[None, top_x].reshape(-1, shape[-1]))
            final.index_add_(0, top_x, (out * w[top_x, idx, None]).to(h.dtype))
            aux.index_add_(0, top_x, out)
        return (final + 0.5 * aux).reshape(shape)


def test_loop_accumulating_into_two_outputs():
    torch.manual_seed(13)
    module = _TwoAccumulators(num_experts=4, top_k=2).to(BF16)
    rec = Recorder(inner="eager")
    check_against_eager(Model(module), _x(2, 5, 16), rec)
    assert_each_loop_accounted(rec.reports, BLOCK)
    assert len(rec.reports) == 2
    for r in rec.reports:
        if not r.rewritten:
            assert "outside the loop" in r.reason, str(r)
    if not any(r.rewritten for r in rec.reports):
        assert rec.count("index_add_") == 8


class _ScaledIndexAdd(RangeMoE):
    """The OLMoE loop, but index_add_(..., alpha=0.5): the loop is in the graph, in a form the pass skips."""

    def forward(self, hidden_states):
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        w = F.softmax(self.gate(h), dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        final = torch.zeros_like(h)
        mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            out = self.experts[e](h[None, top_x].reshape(-1, shape[-1])) * w[top_x, idx, None].to(h.dtype)
            final.index_add_(0, top_x, out, alpha=0.5)
        return final.reshape(shape)


def test_index_add_with_alpha_equals_eager():
    torch.manual_seed(14)
    module = _ScaledIndexAdd(num_experts=4, top_k=2).to(BF16)
    rec = Recorder(inner="eager")
    check_against_eager(module, _x(2, 5, 16), rec)
    assert all(r.rewritten or r.reason for r in rec.reports)


def test_index_add_with_alpha_is_reported(caplog):
    """Regression: the alpha loop used to go unreported, with a warning to call graph_moe.install."""
    torch.manual_seed(14)
    module = _ScaledIndexAdd(num_experts=4, top_k=2).to(BF16)
    rec = Recorder(inner="eager")
    with caplog.at_level(logging.WARNING, logger="graph_moe"):
        torch.compile(module, backend=rec.backend)(_x(2, 5, 16))
    assert "holds no expert loop" not in caplog.text
    (report,) = rec.reports
    assert not report.rewritten and "alpha" in report.reason
    assert_reason_and_hint(report)


def test_skipped_report_shows_the_routing_it_found():
    torch.manual_seed(14)
    module = _ScaledIndexAdd(num_experts=4, top_k=2).to(BF16)
    rec = Recorder(inner="eager")
    torch.compile(Model(module), backend=rec.backend)(_x(2, 5, 16))
    (report,) = rec.reports
    assert not report.rewritten and str(report).startswith(f"{BLOCK}: 4 experts, top-2 -> left as traced"), str(report)


class _OnDevice(nn.Module):
    """An expert kept on its own device: its input moves there and its output comes back (as accelerate's
    hooks do when a device_map splits a block)."""

    def __init__(self, expert, device):
        super().__init__()
        self.expert = expert.to(device)

    def forward(self, x):
        device = next(self.expert.parameters()).device
        return self.expert(x.to(device)).to(x.device)


def test_experts_on_different_devices_are_left_alone():
    """Experts 2 and 3 on "meta" (a second device without a GPU): the loop is left as traced and the reason names
    the devices. Meta tensors hold no data, so the graph cannot run, exactly as eager cannot."""
    module = _block(seed=20)
    for e in range(4):
        module.experts[e] = _OnDevice(module.experts[e], "meta" if e >= 2 else "cpu")
    rec = Recorder(inner="eager")
    with pytest.raises(NotImplementedError, match="meta"):
        module(_x(2, 5, 16))
    with pytest.raises(NotImplementedError, match="meta"):
        torch.compile(Model(module), backend=rec.backend)(_x(2, 5, 16))
    assert_each_loop_accounted(rec.reports, BLOCK)
    assert_left_alone(rec, 4, "expert 2", "meta")
    assert "one device" in rec.reports[0].hint


def test_expert_parameters_on_another_device_are_named():
    """The leaf check itself: the graph of an ordinary block, whose example values say that expert 2's weights live
    on another device (moved to "meta" before the pass runs), is left as traced, naming weights and devices."""
    module = _block(seed=21)
    rec = Recorder(inner="eager")
    moved = []

    def experts_2_elsewhere(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            if source_name(node).startswith("experts.2."):
                value = example_value(node)
                with value.fake_mode:
                    node.meta["example_value"] = value.to("meta")
                moved.append(source_name(node))
        return rec.backend(gm, example_inputs)

    x = _x(2, 5, 16)
    _close(torch.compile(module, backend=experts_2_elsewhere)(x), module(x), "output", TOL[BF16])
    assert sorted(moved) == ["experts.2.down_proj.weight", "experts.2.gate_proj.weight", "experts.2.up_proj.weight"]
    (report,) = rec.reports
    assert not report.rewritten
    assert "different devices (cpu against meta)" in report.reason, report.reason
    assert "experts.2." in report.reason and "l_self_" not in report.reason, report.reason
    assert rec.count("index_add_") == 4 and rec.count("_grouped_mm") == 0


# ----------------------------------------------------------------------------------------------------------
# state changes


class _DropoutExpert(Expert):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.down_proj(self.drop(self.act(self.gate_proj(x)) * self.up_proj(x)))


def test_train_eval_switch():
    module = _block(seed=15)
    for i in range(4):
        module.experts[i] = _DropoutExpert(16, 32).to(BF16)
    x = _x(2, 5, 16)
    rec = Recorder()
    module.eval()
    check_against_eager(module, x, rec)  # dropout off: exactly eager
    module.train()
    compiled = torch.compile(module, backend=rec.backend)
    torch.manual_seed(0)
    out_train = compiled(x)
    with torch.no_grad():
        out_eval = module.eval()(x)
    module.train()
    assert not torch.equal(out_train, out_eval), "dropout must be active in train mode"
    assert torch.isfinite(out_train.float()).all()
    module.eval()
    _close(compiled(x), out_eval, "eval again", TOL[BF16])
    # eval (input with grad), train, eval (input without grad): one graph each, every one rewritten
    assert len(rec.graphs) == len(rec.reports) == 3 and all(r.rewritten for r in rec.reports), \
        [str(r) for r in rec.reports]


def test_frozen_expert_weights():
    """Experts 1 and 3 frozen, and expert 2's down_proj: exactly the trainable weights get gradients."""
    module = _block(seed=16)
    for e in (1, 3):
        module.experts[e].requires_grad_(False)
    module.experts[2].down_proj.weight.requires_grad_(False)
    rec = Recorder()
    check_against_eager(module, _x(2, 5, 16), rec)
    assert_rewritten(rec)
    # toggle after compiling: unfreeze expert 1, freeze the router; guards recompile, grads still match
    module.experts[1].requires_grad_(True)
    module.gate.weight.requires_grad_(False)
    check_against_eager(module, _x(2, 5, 16, seed=101), rec)
    assert len(rec.graphs) == 2 and all(r.rewritten for r in rec.reports)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(mode):
    ctx = getattr(torch, mode)
    module = _block(seed=17)
    rec = Recorder()
    check_against_eager(module, _x(2, 5, 16), rec, ctx=ctx, backward=False)
    assert_rewritten(rec)
    # then with gradients: a graph of its own, equal to eager
    check_against_eager(module, _x(2, 5, 16, seed=102), rec)
    assert all(r.rewritten for r in rec.reports)


def test_weights_changed_after_compiling():
    """Weights edited in place (by hand, by an optimizer step) or replaced by a new Parameter after compiling:
    the compiled graph reads the current values, equal to eager with every gradient."""
    module = _block(seed=22)
    rec = Recorder()
    compiled = torch.compile(module, backend=rec.backend)
    check_against_eager(module, _x(2, 5, 16), rec)
    with torch.no_grad():
        module.experts[1].up_proj.weight.mul_(3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    compiled(_x(2, 5, 16)).float().square().sum().backward()
    optimizer.step()
    check_against_eager(module, _x(2, 5, 16, seed=103), rec)
    module.experts[2].gate_proj.weight = nn.Parameter(torch.randn_like(module.experts[2].gate_proj.weight))
    check_against_eager(module, _x(2, 5, 16, seed=104), rec)
    assert rec.reports and all(r.rewritten for r in rec.reports), [str(r) for r in rec.reports]


# ----------------------------------------------------------------------------------------------------------
# property-based


def _relu_ties(module, x, cfg) -> bool:
    """Whether a ReLU input lands on the other side of 0 (or on it) when the projection's bias is added after the
    GEMM, as the grouped graph adds it (torch._grouped_mm takes no bias), rather than inside it (eager's addmm): one
    rounding more in bf16 can turn 1.8e-4 into 0.0, and ReLU's gradient then drops a whole row of the weight's
    gradient. Both results are right; such draws are skipped."""
    if not cfg["bias"] or cfg["act"] != "relu":
        return False
    rows = x.reshape(-1, x.shape[-1])
    for expert in module.experts:
        linear = expert.gate_proj if cfg["gated"] else expert.up_proj
        inside, after = F.linear(rows, linear.weight, linear.bias), F.linear(rows, linear.weight) + linear.bias
        if ((inside > 0) != (after > 0)).any():
            return True
    return False


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_blocks_match_eager_or_are_reported(data):
    """Random block configurations and dtypes: rewritten and equal to eager (output, input gradient and every
    parameter gradient, at the dtype's precision), or left as traced with a reason and a hint."""
    E = data.draw(st.integers(1, 8), label="E")
    cfg = dict(num_experts=E, top_k=data.draw(st.integers(1, E), label="k"),
               hidden=data.draw(st.sampled_from([8, 12, 16, 24]), label="hidden"),
               inter=data.draw(st.sampled_from([8, 16, 20, 32]), label="inter"),
               gated=data.draw(st.booleans(), label="gated"), bias=data.draw(st.booleans(), label="bias"),
               act=data.draw(st.sampled_from(sorted(ACTIVATIONS)), label="act"))
    dtype = data.draw(st.sampled_from([BF16, torch.float16, torch.float32]), label="dtype")
    tokens = data.draw(st.integers(1, 12), label="tokens")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch._dynamo.reset()  # per example: fresh modules would otherwise pile up recompiles
    reset_counters()
    torch.manual_seed(seed)
    module = RangeMoE(**cfg).to(dtype)
    x = torch.randn(1, tokens, cfg["hidden"], dtype=dtype)
    assume(not _relu_ties(module, x, cfg))
    rec = Recorder()
    compiled = torch.compile(module, backend=rec.backend)
    x_ref, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = module(x_ref)
    seed_grad = torch.randn_like(ref)
    ref.backward(seed_grad)
    ref_grads = _param_grads(module)
    module.zero_grad(set_to_none=True)
    out = compiled(x_c)
    out.backward(seed_grad)
    (report,) = rec.reports
    what = f"{cfg} {dtype}"
    if report.rewritten:
        assert rec.count("index_add_") == 0
        assert rec.count("_grouped_mm") + rec.count("grouped_mm") == len(report.projections)  # gate+up: one
        assert out.dtype == ref.dtype
        _close(out, ref, f"output {what}", TOL[dtype])
        _close(x_c.grad, x_ref.grad, f"input grad {what}", TOL[dtype])
        for name, g in _param_grads(module).items():
            _close(g, ref_grads[name], f"grad of {name} {what}", TOL[dtype])
    else:
        assert report.reason.strip() and report.hint.strip(), str(report)
        assert rec.count("index_add_") == E

# ----------------------------------------------------------------------------------------------------------
# messages


def test_block_compiled_on_its_own_is_named_as_a_module():
    """Regression: the report named the block after its accumulator's FX node ('final: 4 experts ...')."""
    module = _block(seed=18)
    module.experts[1].act = F.relu
    rec = Recorder(inner="eager")
    compiled = torch.compile(module, backend=rec.backend)
    compiled(_x(2, 5, 16))
    (report,) = rec.reports
    node_names = {n.name for g in rec.graphs for n in g.graph.nodes}
    assert report.block not in node_names, f"block {report.block!r} is an FX value, not a module: {report}"



def _render(node) -> str | None:
    """The text of a string literal or f-string, with each {...} as X; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_render(v) if isinstance(v, ast.Constant) else "X" for v in node.values)
    return None


def _skip_reasons() -> list[str]:
    """Every reason the pass can give for leaving a loop as traced, read from its source: Unprovable(...) in
    passes/, the two `fail` helpers of prove_bodies.py with the prefix they add, and the `problem` strings of
    find_loops.py (set on the candidate, or returned by the routing check)."""
    reasons = []
    for path in sorted(pathlib.Path(pass_report.__file__).parent.glob("*.py")):  # every module of passes/
        tree = ast.parse(path.read_text())
        for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            prefix = {"_Matcher": "expert X differs from expert 0 at X vs X: ", "_RowCheck": "X (X): "}.get(cls.name)
            for call in ast.walk(cls):
                if prefix and isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "fail":
                    reasons.append(prefix + (_render(call.args[-1]) or "X"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Unprovable" and node.args:
                text = _render(node.args[0])
                reasons += [text] if text is not None else []
            if path.name == "find_loops.py":
                targets = node.targets if isinstance(node, ast.Assign) else []
                if any(getattr(t, "attr", getattr(t, "id", None)) in ("problem", "scaled") for t in targets):
                    reasons += [t for t in _strings(node.value) if t]  # not the "" that starts them
                if isinstance(node, ast.FunctionDef) and node.name == "_routing":
                    reasons += [s for r in ast.walk(node) if isinstance(r, ast.Return) for s in _strings(r.value)]
    return reasons


def _strings(node) -> list[str]:
    """The string literals and f-strings in an expression (not the pieces inside an f-string)."""
    text = _render(node)
    if text is not None:
        return [text]
    return [s for child in ast.iter_child_nodes(node) for s in _strings(child)]


def test_every_skip_reason_in_the_pass_has_a_hint():
    reasons = _skip_reasons()
    assert "the expert mask is not one_hot(expert ids)" in reasons and "index_add_ along dim X, not 0" in reasons
    assert len(reasons) >= 40, reasons  # the source was read: prove_bodies alone gives more than 30
    missing = [r for r in reasons if hint_for(r) == GENERIC_HINT]
    assert not missing, f"reasons without a hint in passes/report.py HINTS: {missing}"


@pytest.mark.parametrize("reason,words", [
    ("expert 2 differs from expert 0 at experts.0.up_proj.weight vs experts.2.up_proj.weight: expert parameters on "
     "different devices (cuda:0 against cuda:1)", ["one device"]),
    ("expert 2 differs from expert 0 at cpu vs meta: constants device(type='cpu') and device(type='meta')",
     ["one device"]),
    ("expert 1 differs from expert 0 at linear_3 vs to_4: linear against to", ["identical", "filter_fn"]),
    ("the rows per expert have a static count (0, e.g. an empty batch): nothing to group", ["no tokens"]),
    ("internal error while rewriting: RuntimeError('x')", ["GRAPH_MOE_DEBUG=1", "report"]),
    ("mul_3 (mul): broadcasts l_x_ across rows", ["row"]),
], ids=["device-leaf", "device-constant", "heterogeneous", "empty-batch", "internal-error", "row-wise"])
def test_hint_fits_the_reason(reason, words):
    hint = hint_for(reason)
    assert all(w in hint for w in words), hint


def test_errors_name_the_cause_and_the_choices():
    """The errors graph_moe raises at the user say what was wrong and what is accepted."""
    import graph_moe

    with pytest.raises(ValueError, match=r"graph_moe: inner compiler must be one of .*inductor.* or a backend "
                                         r"callable, not 'tvm'"):
        graph_moe.make_backend("tvm")
    with pytest.raises(TypeError, match=r"graph_moe: fuse_projections must be a bool, not 'yes'"):
        graph_moe.inductor_pass(fuse_projections="yes")
    with pytest.raises(TypeError, match=r"graph_moe: then= must be a graph pass \(callable on a torch.fx.Graph\)"):
        graph_moe.inductor_pass(then=42)

"""The router's top-k (graph_moe/kernels/router_topk.py): equal to torch.topk on fresh random scores, eager and under Inductor,
forward and gradient; ties to the lowest index; on CUDA its Triton kernel chooses as ATen's CUDA top-k does (checked
on the GPU); replaced in a rewritten model by default, only on the devices whose torch.topk breaks ties that way, and
then the model still matches eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.kernels import router_topk as router_topk_module
from graph_moe.kernels.router_topk import router_topk
from helpers import Keep, assert_close_bf16, assert_grads_close, loss_and_grads
from tiny_models import build


def _scores(tokens, experts, ties=False, device="cpu"):
    logits = torch.randn(tokens, experts, device=device)
    if ties:  # few distinct logits per row: most rows tie at the k-th score
        logits = logits.mul(2).round()
    return torch.softmax(logits, dim=-1)


def _top(k, compiled):
    def top(scores):
        return router_topk(scores, k)

    return torch.compile(top, backend="inductor") if compiled else top


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_router_topk_is_topk(compiled):
    """Values and indices as torch.topk's on distinct scores; the scores' gradient as topk's."""
    torch.library.opcheck(router_topk, (_scores(9, 12), 3))
    fn = _top(5, compiled)
    scores = _scores(37, 24).requires_grad_()
    reference = scores.detach().clone().requires_grad_()
    values, indices = fn(scores)
    ref_values, ref_indices = torch.topk(reference, 5)
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)
    grad = torch.randn_like(values)
    values.backward(grad)
    ref_values.backward(grad)
    assert torch.equal(scores.grad, reference.grad)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_router_topk_ties_go_to_lowest_index(compiled):
    """On scores with many equal values: the k largest, equal ones in index order (a stable descending sort)."""
    fn = _top(4, compiled)
    scores = _scores(64, 16, ties=True)
    values, indices = fn(scores)
    ref_values, ref_indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    assert torch.equal(indices, ref_indices[:, :4]) and torch.equal(values, ref_values[:, :4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ATen's CUDA top-k is what the rule must match")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_cuda_topk_picks_the_same_experts(compiled):
    """The rewrite's premise: on CUDA, torch.topk chooses the same k experts as router_topk (its Triton kernel), ties
    included, in the same order with the same values: at the Qwen3-30B-A3B router's shape and at odd ones (experts not
    a power of two, bf16 scores, leading dims, strided rows, one row, no rows), and under Inductor (dynamic shapes)."""
    from graph_moe.kernels.router_topk import triton
    assert triton is not None, "the GPU machine has Triton: the kernel must be what runs here"
    fn = torch.compile(lambda s, k: router_topk(s, k), backend="inductor", dynamic=True) if compiled else router_topk
    for tokens, experts, k, dtype in [(4096, 128, 8, torch.float32), (4097, 128, 8, torch.float32),
                                      (333, 60, 4, torch.float32), (257, 64, 6, torch.bfloat16),
                                      (65, 8, 2, torch.float32), (1, 256, 8, torch.float32),
                                      (300, 1000, 16, torch.float32)]:
        for ties in (False, True):
            scores = _scores(tokens, experts, ties=ties, device="cuda").to(dtype)
            values, indices = fn(scores, k)
            ref_values, ref_indices = torch.sort(scores, dim=-1, descending=True, stable=True)
            assert torch.equal(indices, ref_indices[:, :k]), (tokens, experts, k, dtype, ties)
            assert torch.equal(values, ref_values[:, :k])
            top_values, top_indices = torch.topk(scores, k)
            assert torch.equal(values, top_values)
            assert torch.equal(indices.sort(-1).values, top_indices.sort(-1).values)
    if compiled:
        return
    batched = _scores(3 * 40, 128, ties=True, device="cuda").view(3, 40, 128)
    strided = _scores(50, 256, device="cuda")[:, ::2]
    for scores in (batched, strided, _scores(0, 128, device="cuda")):
        values, indices = router_topk(scores, 8)
        ref_values, ref_indices = torch.sort(scores, dim=-1, descending=True, stable=True)
        assert torch.equal(indices, ref_indices[..., :8]) and torch.equal(values, ref_values[..., :8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_cuda_topk_gradient_and_nan():
    """The kernel's values carry topk's gradient; a NaN score ranks first, as in torch.topk, and never yields an
    index outside the row."""
    scores = _scores(700, 128, device="cuda").requires_grad_()
    reference = scores.detach().clone().requires_grad_()
    values, indices = router_topk(scores, 8)
    ref_values, _ = torch.topk(reference, 8)
    grad = torch.randn_like(values)
    values.backward(grad)
    ref_values.backward(grad)
    assert torch.equal(scores.grad, reference.grad)
    nan = _scores(16, 128, device="cuda")
    nan[3, 77] = float("nan")
    values, indices = router_topk(nan, 8)
    assert indices.min() >= 0 and indices.max() < 128
    assert indices[3, 0] == 77 and values[3, 0].isnan()
    assert torch.equal(indices[4:], torch.topk(nan[4:], 8).indices)


def _router_ties(model, ids, k) -> bool:
    """Whether some token's k-th and (k+1)-th router scores are equal in an eager run (bf16 logits tie often)."""
    scores = []
    hooks = [m.register_forward_hook(lambda m, i, out: scores.append(torch.softmax(out.float(), -1)))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return any((s.sort(-1, descending=True).values[:, k - 1] == s.sort(-1, descending=True).values[:, k]).any()
               for s in scores)


def test_rewritten_model_uses_router_topk(monkeypatch):
    """With the CPU counted as a device whose topk ties as router_topk does, the rewritten Qwen3-MoE routes through
    router_topk (no torch.topk left) and its logits and gradients equal eager's, on fresh tokens whose router scores
    have no tie at the k-th (where CPU's topk chooses otherwise)."""
    monkeypatch.setattr(router_topk_module, "DEVICES", {"cuda", "cpu"})
    model = build("qwen3_moe", layers=1, experts=8, top_k=2)
    reference = build("qwen3_moe", layers=1, experts=8, top_k=2)
    reference.load_state_dict(model.state_dict())
    keep = Keep()
    counters.clear()
    graph_moe.compile(model, inner=keep)  # router_topk is on by default
    for _ in range(50):
        ids = torch.randint(0, 64, (2, 9))
        if not _router_ties(reference, ids, 2):
            break
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads = loss_and_grads(model, ids)
    assert counters["graph_moe"]["router_topk"] == 1
    assert keep.count("topk") == 0 and sum(
        n.target is torch.ops.graph_moe.router_topk for g in keep.graphs for n in g.graph.nodes) == 1
    assert_close_bf16(logits, ref_logits, "logits")
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("on_cpu", [False, True], ids=["turned-off", "device-not-listed"])
def test_torch_topk_stays(on_cpu, monkeypatch):
    """With router_topk=False, or on the CPU by default (not in DEVICES: its tie rule is not router_topk's), the
    rewritten model keeps torch.topk."""
    if not on_cpu:
        monkeypatch.setattr(router_topk_module, "DEVICES", {"cuda", "cpu"})
    model = build("qwen3_moe", layers=1, experts=8, top_k=2)
    keep = Keep()
    graph_moe.compile(model, inner=keep, **({} if on_cpu else {"router_topk": False}))
    model(input_ids=torch.randint(0, 64, (2, 5)), use_cache=False)
    assert keep.count("topk") == 1
    assert not any(n.target is torch.ops.graph_moe.router_topk for g in keep.graphs for n in g.graph.nodes)

"""graph_moe::grouped_mm on CUDA (graph_moe/kernels/grouped_op_cuda.py): the Triton kernels for what torch._grouped_mm cannot
compile (float32 and float16 rows, PEFT's default float32 adapters, rows not in 16-byte units) equal the per-group
loop in every dtype, with no host sync, and a compiled model with PEFT's default adapters equals eager. On the CPU
the op is the loop (tests/test_pass.py, tests/test_lora.py); these tests need a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import graph_moe
from graph_moe.kernels import grouped_op_cuda
from graph_moe.stacked_adapters import split_stacked
from helpers import Keep
from tiny_models import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or grouped_op_cuda.triton is None,
                                reason="the Triton kernels need CUDA")
op = torch.ops.graph_moe.grouped_mm
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _offsets(groups: int, rows: int, empty=(), short=0) -> torch.Tensor:
    """Random group sizes over `rows` - `short` rows (the last `short` rows in no group); `empty` groups get none."""
    ids = torch.randint(0, groups, (rows - short,), device="cuda")
    for g in empty:
        ids[ids == g] = (g + 1) % groups
    return torch.bincount(ids, minlength=groups).cumsum(0).to(torch.int32)


def _loop(x, w, offs):
    """The reference in float64: each group's rows times its weight; rows past the last offset zero."""
    out, start = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float64, device=x.device), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].double() @ w[g].double()
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups, k, n, rows, empty",
                         [(8, 64, 16, 300, (1,)), (6, 16, 96, 257, (1,)), (5, 12, 20, 33, (1,)),
                          (128, 2048, 16, 2048, (1,)), (3, 40, 8, 0, (1,)), (128, 64, 16, 500, range(1, 120))],
                         ids=["lora-a", "lora-b", "unaligned", "qwen3-a", "no-rows", "mostly-empty"])
def test_forward_and_gradients_equal_the_loop(dtype, groups, k, n, rows, empty):
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(groups, n, k, device="cuda", dtype=dtype) / k ** 0.5).transpose(-2, -1)  # (G, K, N) view
    w = w.detach().requires_grad_()
    offs = _offsets(groups, rows, empty=empty, short=min(rows, 3))
    y = op(x, w, offs)
    seed = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), seed)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _loop(xr, wr, offs)
    ref_gx, ref_gw = torch.autograd.grad(ref, (xr, wr), seed.double())
    for got, want, what in ((y, ref, "output"), (gx, ref_gx, "input grad"), (gw, ref_gw, "weight grad")):
        assert got.dtype == dtype and got.shape == want.shape, what
        if want.numel():
            scale = want.abs().max().clamp_min(1e-6)
            assert ((got.double() - want).abs().max() / scale).item() < TOLERANCE[dtype], what
    assert (gw[1] == 0).all()  # the empty group's weight gradient
    if rows:
        assert (y[-3:] == 0).all()  # rows in no group


def test_no_host_sync_and_capturable_by_cuda_graphs():
    x = torch.randn(512, 64, device="cuda", requires_grad=True)
    w = torch.randn(8, 64, 16, device="cuda", requires_grad=True)
    offs = _offsets(8, 512)
    seed = torch.randn(512, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = op(x, w, offs)
        gx, gw = torch.autograd.grad(y, (x, w), seed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    static_x = x.detach().clone()
    with torch.cuda.graph(graph):
        captured = op(static_x, w.detach(), offs)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.testing.assert_close(captured, op(static_x, w.detach(), offs))


def test_peft_default_float32_adapters_take_the_op_and_equal_eager():
    """PEFT's get_peft_model keeps a bf16 model's adapters in float32: their GEMMs take this op."""
    torch.manual_seed(0)
    model = get_peft_model(build("qwen3_moe").cuda(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                target_modules=["gate_proj", "up_proj", "down_proj"]))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    reference = copy.deepcopy(model)
    keep = Keep("inductor")
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 24), device="cuda")
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert keep.count("grouped_mm") >= 1 and keep.count("index_add") == 0
    ref_loss = reference(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward(), ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    grads = split_stacked({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).norm() <= 0.05 * ref.norm() + 1e-6, name

"""graph_moe::grouped_mm_few_rows (graph_moe/kernels/grouped_mm_few_rows.py): torch._grouped_mm for frozen weights, with a Triton
kernel on CUDA when the experts get few rows. On the CPU the op is torch._grouped_mm; the kernel's tests need a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import graph_moe
from graph_moe.passes import emit_grouped
from graph_moe.kernels import grouped_mm_few_rows as few
from graph_moe.kernels import triton_grouped_mm as kernel
from helpers import Keep, assert_close_bf16, assert_grads_close, loss_and_grads
from tiny_models import build

op = torch.ops.graph_moe.grouped_mm_few_rows


def _offsets(experts: int, rows: int, device, empty=()) -> torch.Tensor:
    """Random group sizes summing to `rows`, the groups in `empty` without rows."""
    ids = torch.randint(0, experts, (rows,), device=device)
    for e in empty:
        ids[ids == e] = (e + 1) % experts
    return torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)


def _operands(experts, k, n, rows, device, transposed_view, empty=()):
    """Rows (rows, K) and weights b (E, K, N): a transposed (E, N, K) stack as the forward passes it, or a
    contiguous one as its input gradient does."""
    w = torch.randn(experts, n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
    b = w.transpose(-2, -1) if transposed_view else w.transpose(-2, -1).contiguous()
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    return x, b, _offsets(experts, rows, device, empty)


def _check(device, experts, k, n, rows, transposed_view, empty=()):
    x, b, offs = _operands(experts, k, n, rows, device, transposed_view, empty)
    x.requires_grad_()
    y = op(x, b, offs)
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    xr = x.detach().clone().requires_grad_()
    ref = torch._grouped_mm(xr, b, offs=offs)
    (ref_gx,) = torch.autograd.grad(ref, xr, grad)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.float(), ref_gx.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("transposed_view", [True, False])
def test_op_equals_grouped_mm_on_cpu(transposed_view):
    torch.manual_seed(0)
    _check("cpu", 6, 64, 48, 40, transposed_view, empty=(1, 4))


def test_no_rows_give_no_rows():
    x = torch.randn(0, 64, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(4, 32, 64, dtype=torch.bfloat16).transpose(-2, -1)
    y = op(x, b, torch.zeros(4, dtype=torch.int32))
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 64)


def test_weights_that_need_a_gradient_are_refused():
    x, b, offs = _operands(4, 32, 16, 12, "cpu", True)
    b.requires_grad_()
    with pytest.raises(RuntimeError, match="computes no weight gradient"):
        op(x, b, offs).sum().backward()


def test_config_follows_rows_per_expert(monkeypatch):
    """Decided on fake CUDA tensors (no GPU needed): 16-row tiles up to 8 rows per expert, 64-row ones up to 128,
    CUTLASS (None) above; a column tile that divides N, or CUTLASS where none does and the columns are contiguous."""
    monkeypatch.setattr(kernel, "triton", True)
    with torch._subclasses.FakeTensorMode():
        def config(rows, experts=128, k=2048, n=1536, dtype=torch.bfloat16, columns_contiguous=False):
            w = torch.empty(experts, n, k, device="cuda", dtype=dtype)
            b = w.transpose(-2, -1) if not columns_contiguous else torch.empty(experts, k, n, device="cuda",
                                                                                dtype=dtype)
            return few.config_for(torch.empty(rows, k, device="cuda", dtype=dtype), b)

        assert config(8)[:3] == config(1024)[:3] == (16, 256, 64)
        assert config(1025)[:3] == config(128 * 128)[:3] == (64, 256, 64)
        assert config(128 * 128 + 1) is None and config(0) is None
        assert config(4096, n=1408)[1] == 128 and config(4096, n=1408, columns_contiguous=True)[1] == 128
        assert config(4096, n=1400)[1] == 64 and config(4096, n=1400, columns_contiguous=True) is None
        assert config(4096, k=100) is None and config(4096, dtype=torch.float16) is None
        rows = torch.empty(64, 2048, device="cuda", dtype=torch.bfloat16)
        assert few.config_for(rows, torch.empty(8, 2048, 64, dtype=torch.bfloat16)) is None  # CPU weights
    monkeypatch.setattr(kernel, "triton", None)
    with torch._subclasses.FakeTensorMode():
        assert few.config_for(torch.empty(64, 2048, device="cuda", dtype=torch.bfloat16),
                              torch.empty(8, 2048, 64, device="cuda", dtype=torch.bfloat16)) is None


def test_emitted_for_frozen_cuda_weights_under_cuda_graphs():
    """Decided on fake CUDA tensors: only where Inductor captures CUDA graphs (its host time costs more than it saves
    otherwise), only for weights without a gradient, only on CUDA."""
    import torch._inductor.config as inductor_config

    with torch._subclasses.FakeTensorMode():
        x = torch.empty(64, 32, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(4, 32, 16, device="cuda", dtype=torch.bfloat16)
        assert not emit_grouped._few_rows_op_fits(x, w)
        with inductor_config.patch({"triton.cudagraphs": True}):
            assert emit_grouped._few_rows_op_fits(x, w)
            assert not emit_grouped._few_rows_op_fits(x, w.clone().requires_grad_())
            assert not emit_grouped._few_rows_op_fits(torch.empty(64, 32, dtype=torch.bfloat16), w)


@pytest.mark.parametrize("mode,options,expected", [(None, None, False), ("reduce-overhead", None, True),
                                                   (None, {"triton.cudagraphs": True}, True),
                                                   ("max-autotune-no-cudagraphs", None, False)])
def test_backend_rewrites_under_the_inductor_config_it_compiles_with(monkeypatch, mode, options, expected):
    """make_backend's rewrite runs under the config torch.compile(mode=..., options=...) gives Inductor, as a pass
    inside Inductor would (Inductor itself is not run here)."""
    import importlib

    import torch._inductor.config as inductor_config

    backend_module = importlib.import_module("graph_moe.backend")
    seen = []
    monkeypatch.setattr(emit_grouped, "_few_rows_op_fits",
                        lambda x, w: seen.append(bool(inductor_config.triton.cudagraphs)) or False)
    monkeypatch.setattr(backend_module, "run_inner", lambda inner, gm, example_inputs, **kw: gm.forward)
    block = [m for m in build("qwen3_moe").modules() if type(m).__name__.endswith("SparseMoeBlock")][0]
    graph_moe.install(block)
    with graph_moe.capture_settings():
        torch.compile(block, backend=graph_moe.make_backend("inductor", mode=mode, options=options))(
            torch.randn(1, 5, 32, dtype=torch.bfloat16))
    assert seen and set(seen) == {expected}
    assert not inductor_config.triton.cudagraphs  # patched for the rewrite only


def test_inductor_pre_grad_pass_rewrites_under_the_compile_options(monkeypatch, tmp_path):
    """As Inductor's pre-grad pass (graph_moe.inductor_options()), the rewrite runs under the options torch.compile
    gives Inductor: with triton.cudagraphs on, it sees them on (Inductor compiles on the CPU without the graphs)."""
    import importlib

    import torch._inductor.config as inductor_config

    from moe_blocks import RangeMoE

    seen = []
    monkeypatch.setattr(emit_grouped, "_few_rows_op_fits",
                        lambda x, w: seen.append(bool(inductor_config.triton.cudagraphs)) or False)
    torch.manual_seed(0)
    block = RangeMoE(hidden=16, inter=32, num_experts=4, top_k=2).to(torch.bfloat16)
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    options = {**importlib.import_module("graph_moe.inductor_pass").inductor_options(), "triton.cudagraphs": True}
    with torch._inductor.utils.fresh_cache(dir=str(tmp_path)), graph_moe.capture_settings(), torch.no_grad():
        out = torch.compile(block, options=options)(x)
    assert seen and set(seen) == {True}
    assert_close_bf16(out, block(x), "output")


def _emitted_on_any_device(monkeypatch):
    """The pass emits the op for CUDA rows under CUDA graphs only; here it does on the CPU too, so its place in the
    graphs and its gradient are checked without a GPU (the op is torch._grouped_mm there)."""
    monkeypatch.setattr(emit_grouped, "_few_rows_op_fits", lambda x, w: not w.requires_grad)


def _compiled_and_eager(monkeypatch, model):
    """The kept graphs of `model` under graph_moe.compile (the op emitted on the CPU too), and its loss and
    gradients beside an eager copy's: ((logits, grads), (eager logits, eager grads))."""
    _emitted_on_any_device(monkeypatch)
    reference = copy.deepcopy(model)
    keep = Keep()
    graph_moe.compile(model, inner=keep)
    ids = torch.randint(0, 64, (2, 6))
    return keep, loss_and_grads(model, ids), loss_and_grads(reference, ids)


def test_frozen_experts_use_it_and_match_eager(monkeypatch):
    model = build("qwen3_moe")
    for name, p in model.named_parameters():
        p.requires_grad_("experts" not in name)
    keep, (logits, grads), (ref_logits, ref_grads) = _compiled_and_eager(monkeypatch, model)
    # gate+up and down in each compiled graph
    assert keep.count("grouped_mm_few_rows") == 2 * len(keep.graphs) > 0 and keep.count("_grouped_mm") == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys() and grads
    assert_grads_close(grads, ref_grads)


def test_lora_base_weights_use_it_and_adapters_keep_grouped_mm(monkeypatch):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(build("qwen3_moe"), config, autocast_adapter_dtype=False)
    keep, (logits, grads), (ref_logits, ref_grads) = _compiled_and_eager(monkeypatch, model)
    # the base weights' gate+up and down; the adapters' A and B factors train: torch._grouped_mm (or, at r=4, whose
    # rows are not whole 16-byte units, the fallback op)
    graphs = len(keep.graphs)
    assert keep.count("grouped_mm_few_rows") == 2 * graphs > 0
    assert keep.count("_grouped_mm") + keep.count("grouped_mm") == 5 * graphs
    assert_close_bf16(logits, ref_logits, "logits")
    lora = [n for n in ref_grads if "lora_" in n and "experts" in n]
    assert lora
    for name in lora:
        assert_close_bf16(grads[name], ref_grads[name], name)


cuda = pytest.mark.skipif(not torch.cuda.is_available() or kernel.triton is None, reason="the Triton kernel needs CUDA")


@cuda
@pytest.mark.parametrize("transposed_view", [True, False])
@pytest.mark.parametrize("experts,k,n,rows", [(128, 256, 192, 1), (128, 256, 192, 64), (128, 256, 192, 4096),
                                              (16, 128, 1408, 900), (8, 192, 64, 0)])
def test_triton_kernel_equals_grouped_mm(transposed_view, experts, k, n, rows):
    """1, 0.5 and 32 rows per expert (16- and 64-row tiles), empty groups, N = 1408 (DeepSeek-V2-Lite's
    intermediate: 128-column tiles), and no rows at all."""
    torch.manual_seed(0)
    x, b, _ = _operands(experts, k, n, max(rows, 1), "cuda", transposed_view)
    assert rows == 0 or few.config_for(x[:rows], b) is not None
    _check("cuda", experts, k, n, rows, transposed_view, empty=(2, 3))


@cuda
def test_triton_kernel_replays_in_a_cuda_graph():
    """Captured once (mode="reduce-overhead"), replayed on new rows and new offsets: nothing depends on the
    offsets' values on the host."""
    torch.manual_seed(0)
    x, b, offs = _operands(64, 256, 384, 512, "cuda", True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(x, b, offs)  # Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(x, b, offs)
    x.copy_(torch.randn_like(x))
    offs.copy_(_offsets(64, 512, "cuda", empty=(2, 5, 40)))
    graph.replay()
    torch.testing.assert_close(y.float(), torch._grouped_mm(x, b, offs=offs).float(), rtol=2e-2, atol=2e-2)

"""graph_moe::grouped_mm_4bit: the grouped GEMM on bitsandbytes 4-bit stacks equals dequantize + torch._grouped_mm,
forward and input gradient, with empty groups and rows past the last group; on CUDA, its chunks and Triton kernel."""

from __future__ import annotations

import pytest
import torch

from graph_moe.kernels import grouped_mm_4bit as op
from graph_moe.kernels import triton_grouped_mm as kernel

bnbf = pytest.importorskip("bitsandbytes.functional")


def _stack(experts, out, inner, quant_type, device):
    w = torch.randn(experts * out, inner, device=device, dtype=torch.bfloat16) / inner ** 0.5
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    return packed.view(-1), state.absmax.float().contiguous(), [experts, out, inner]


def _routing(experts, rows, device, empty=(1,)):
    """int32 end offsets of `experts` groups over fewer than `rows` rows (the rest past the last group), some empty."""
    counts = torch.randint(1, 2 * rows // experts, (experts,))
    counts[list(empty)] = 0
    counts = (counts * (rows - 5) // counts.sum()).clamp(min=0)
    counts[list(empty)] = 0
    return counts.cumsum(0).to(torch.int32).to(device)


def _reference(x, packed, absmax, shape, quant_type, offs, transposed):
    weights = op._dequantized(packed, absmax, shape, 64, quant_type, torch.bfloat16)
    return torch._grouped_mm(x, weights if transposed else weights.transpose(-2, -1), offs=offs)


def _check(device, experts, out, inner, quant_type, rows=200, **options):
    packed, absmax, shape = _stack(experts, out, inner, quant_type, device)
    offs = _routing(experts, rows, device)
    used = int(offs[-1])
    for transposed in (False, True):
        x = torch.randn(rows, out if transposed else inner, device=device, dtype=torch.bfloat16, requires_grad=True)
        if options:  # the kernel with these options, forward only
            y = op._grouped_mm_4bit(x.detach(), packed, absmax, offs, shape, 64, quant_type, transposed, **options)
        else:
            y = torch.ops.graph_moe.grouped_mm_4bit(x, packed, absmax, offs, shape, 64, quant_type, transposed)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = _reference(x_ref, packed, absmax, shape, quant_type, offs, transposed)
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y[:used].float(), y_ref[:used].float(), rtol=2e-2, atol=2e-2)
        if options:
            continue
        grad = torch.randn_like(y)
        grad[used:] = 0  # rows past the last group are not computed by either
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad[:used].float(), x_ref.grad[:used].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_equals_dequantize_then_grouped_mm_cpu(quant_type):
    torch.manual_seed(0)
    _check("cpu", experts=4, out=96, inner=64, quant_type=quant_type)


def test_fake_shapes():
    packed, absmax, shape = _stack(3, 32, 64, "nf4", "cpu")
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)
    with torch._subclasses.FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(10, 64, dtype=torch.bfloat16))
        g = mode.from_tensor(torch.randn(10, 32, dtype=torch.bfloat16))
        packed, absmax, offs = (mode.from_tensor(t) for t in (packed, absmax, offs))
        assert torch.ops.graph_moe.grouped_mm_4bit(x, packed, absmax, offs, shape, 64, "nf4", False).shape == (10, 32)
        assert torch.ops.graph_moe.grouped_mm_4bit(g, packed, absmax, offs, shape, 64, "nf4", True).shape == (10, 64)


def test_no_rows():
    packed, absmax, shape = _stack(3, 32, 64, "nf4", "cpu")
    x = torch.randn(0, 64, dtype=torch.bfloat16, requires_grad=True)
    y = torch.ops.graph_moe.grouped_mm_4bit(x, packed, absmax, torch.zeros(3, dtype=torch.int32), shape, 64, "nf4",
                                            False)
    y.sum().backward()
    assert y.shape == (0, 32) and x.grad.shape == (0, 64)


def test_experts_per_chunk():
    assert op.experts_per_chunk([128, 1536, 2048], 256 * 2**20) == 32  # Qwen3-30B-A3B gate+up: 6 MB an expert
    assert op.experts_per_chunk([128, 2048, 768], 256 * 2**20) == 64
    assert op.experts_per_chunk([8, 4096, 4096], 1) == 1
    assert op.experts_per_chunk([5, 64, 64], 2**30) == 5


@pytest.mark.skipif(not torch.cuda.is_available() or kernel.triton is None, reason="the Triton kernel needs CUDA")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("experts,out,inner", [(8, 192, 128), (5, 96, 320), (16, 64, 64)])
def test_triton_chunks_equal_dequantize_then_grouped_mm(quant_type, experts, out, inner):
    """Out widths that are not a multiple of the tile, several K steps, empty groups, rows past the last group; one
    chunk, and chunks of 1 and 3 experts."""
    torch.manual_seed(0)
    packed, absmax, shape = _stack(experts, out, inner, quant_type, "cuda")
    x = torch.empty(1, inner, device="cuda", dtype=torch.bfloat16)
    assert op._uses_triton(x, packed, absmax, shape, False, op.CONFIG)
    _check("cuda", experts, out, inner, quant_type, rows=700)
    for experts_per_chunk in (1, 3):
        _check("cuda", experts, out, inner, quant_type, rows=700, chunk_bytes=2 * out * inner * experts_per_chunk)


@pytest.mark.skipif(not torch.cuda.is_available() or kernel.triton is None, reason="the Triton kernel needs CUDA")
def test_triton_chunks_replay_in_a_cuda_graph():
    """Captured once (mode="reduce-overhead" does this), replayed on new rows and new offsets: nothing in the op
    depends on the offsets' values on the host."""
    torch.manual_seed(0)
    packed, absmax, shape = _stack(8, 192, 128, "nf4", "cuda")
    offs = _routing(8, 700, "cuda")
    x = torch.randn(700, 128, device="cuda", dtype=torch.bfloat16)

    def run():
        return op._grouped_mm_4bit(x, packed, absmax, offs, shape, 64, "nf4", False, chunk_bytes=2 * 192 * 128 * 3)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    x.copy_(torch.randn_like(x))
    offs.copy_(_routing(8, 700, "cuda", empty=(2, 5)))
    graph.replay()
    used = int(offs[-1])
    ref = _reference(x, packed, absmax, shape, "nf4", offs, False)
    torch.testing.assert_close(y[:used].float(), ref[:used].float(), rtol=2e-2, atol=2e-2)


def test_cuda_without_the_kernel_dequantizes_whole_and_says_why(monkeypatch, caplog):
    """What the op decides for CUDA rows it cannot chunk (decided on fake CUDA tensors: no GPU needed here)."""
    import logging

    monkeypatch.setattr(kernel, "triton", None)
    op._warn_whole_stack.cache_clear()
    with torch._subclasses.FakeTensorMode():
        x = torch.empty(10, 64, device="cuda", dtype=torch.bfloat16)
        packed, absmax = torch.empty(3 * 32 * 32, device="cuda", dtype=torch.uint8), torch.empty(48, device="cuda")
        with caplog.at_level(logging.WARNING, logger="graph_moe"):
            assert not op._uses_triton(x, packed, absmax, [3, 32, 64], False, op.CONFIG)
    assert "Triton is not installed" in caplog.text and "dequantized whole" in caplog.text

"""A grouped GEMM on bitsandbytes 4-bit expert stacks that dequantizes a few experts at a time (`low_memory_4bit`).

The 4-bit layout (graph_moe/layout.py, `Stacked4bit`) keeps one projection's packed weights for every expert.
Dequantizing a whole stack before its grouped GEMM, in the forward and again in the backward (`low_memory_4bit=False`),
makes 805 MB of bf16 for gate+up at Qwen3-30B-A3B, the layer's transient peak (1.24 GB at 4096 tokens against the HF
loop's 0.74, which dequantizes one expert at a time). By default (`low_memory_4bit=True`) the pass emits this op
instead: the experts are dequantized in chunks of at most CHUNK_BYTES, and each chunk's groups of rows are multiplied
before the next chunk is made:

    grouped_mm_4bit(x, packed, absmax, offs, shape, blocksize, quant_type, transposed)
        == torch._grouped_mm(x, W.transpose(-2, -1) or W, offs=offs)
        with W = bitsandbytes' dequantize_4bit(packed, absmax, blocksize, quant_type) viewed as `shape` (E, out, in)

`transposed=False` is the forward (x @ W[e].T: rows of `in` give rows of `out`); `transposed=True` is its input
gradient (rows of `out` give rows of `in`). The weights are frozen (4-bit), so that is all the backward needs.

torch._grouped_mm cannot take a chunk's groups alone: its first group starts at row 0, and where a chunk's rows start
is known only on the GPU. The Triton kernel of triton_grouped_mm.py takes the groups of one chunk: persistent programs
find that chunk's row tiles from the offsets on the GPU (no host sync). Without CUDA or Triton the op is the whole
dequantize and torch._grouped_mm. It is opaque to AOTAutograd: traced into, that dequantize in the forward and the one
in the backward would become one node (CSE), saved from forward to backward.

What it costs (H200, Qwen3-30B-A3B, 4096 tokens; docs/benchmarks.md): the peak of a QLoRA layer's forward+backward
1.24 -> 0.69 GB (HF loop 0.74; benchmarks/records/h200_torch2.11_qwen3_peak_memory_qlora_4096.json). The Triton GEMM
runs 5-15% behind CUTLASS per call (h200_torch2.11_grouped_mm_4bit_chunks.json), and each chunk is a dequantize and a
kernel launch from Python (~60 us of host time; ~0.3 ms a call with 4 chunks): the layer's forward+backward measured
5.68 ms with whole stacks and 6.19 with this op (waited for, one run; h200_torch2.11_qwen3_layer_lora_qlora_4096.json),
both 49x or more the PEFT + bitsandbytes loop, so the default is this op, which keeps the peak below the loop's.

A kernel that dequantized each weight tile in registers, inside the GEMM (no bf16 weights at all), was 12x slower
than dequantize + torch._grouped_mm at 16384 tokens: every row tile dequantizes the tiles again, 8 times per weight
there, and the loads by nibble and the 16-value lookup do not vectorize
(`..._session11_grouped_mm_4bit_in_register_dequant.json`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from .triton_grouped_mm import run_groups, unsupported

log = logging.getLogger("graph_moe")


def _dequantized(packed: Tensor, absmax: Tensor, shape: list[int], blocksize: int, quant_type: str,
                 dtype: torch.dtype) -> Tensor:
    experts, out, inner = shape
    weights = torch.ops.bitsandbytes.dequantize_4bit(packed.view(-1, 1), absmax.view(-1), blocksize, quant_type,
                                                     [experts * out, inner], dtype)
    return weights.view(experts, out, inner)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): chosen on an H200 by benchmarks/kernels/grouped_mm_4bit_chunks.py.
CONFIG = (128, 256, 64, 8, 4)
CHUNK_BYTES = 256 * 2**20  # the most dequantized weights alive at once


def _uses_triton(x: Tensor, packed: Tensor, absmax: Tensor, shape, transposed: bool, config) -> bool:
    if not x.is_cuda:
        return False
    why = ("the 4-bit stack is not contiguous" if not (packed.is_contiguous() and absmax.is_contiguous()) else
           unsupported(x, shape[1] if transposed else shape[2], shape[0], config[2]))
    if why is not None:
        _warn_whole_stack(why)
    return why is None


@functools.cache
def _warn_whole_stack(why: str) -> None:
    log.warning("graph_moe: low_memory_4bit: %s, so this 4-bit stack is dequantized whole (as without the option)", why)


def experts_per_chunk(shape, chunk_bytes: int) -> int:
    """Experts dequantized at once: as many as fit `chunk_bytes` in bf16, spread evenly over the chunks."""
    experts, out, inner = shape
    most = max(1, chunk_bytes // (2 * out * inner))
    chunks = -(-experts // most)
    return -(-experts // chunks)


def _grouped_mm_4bit(x: Tensor, packed: Tensor, absmax: Tensor, offs: Tensor, shape: list[int],
                     blocksize: int, quant_type: str, transposed: bool, config=None, chunk_bytes=None) -> Tensor:
    config = config or CONFIG
    if x.shape[0] == 0:  # no rows (a gradient of no rows may have zero strides, which torch._grouped_mm rejects)
        return x.new_zeros(0, shape[2] if transposed else shape[1])
    if not _uses_triton(x, packed, absmax, shape, transposed, config):
        weights = _dequantized(packed, absmax, shape, blocksize, quant_type, x.dtype)
        return torch._grouped_mm(x, weights if transposed else weights.transpose(-2, -1), offs=offs)
    experts, out, inner = shape
    y = x.new_empty(x.shape[0], inner if transposed else out)
    chunk = experts_per_chunk(shape, chunk_bytes or CHUNK_BYTES)
    per_expert, scales = out * inner // 2, out * inner // blocksize
    for first in range(0, experts, chunk):
        last = min(experts, first + chunk)
        w = _dequantized(packed[first * per_expert:last * per_expert], absmax[first * scales:last * scales],
                         [last - first, out, inner], blocksize, quant_type, x.dtype)
        run_groups(x, w if transposed else w.transpose(-2, -1), offs, y, first, last, config)
        del w  # freed before the next chunk is made
    return y


@torch.library.custom_op("graph_moe::grouped_mm_4bit", mutates_args=())
def grouped_mm_4bit(x: Tensor, packed: Tensor, absmax: Tensor, offs: Tensor, shape: list[int], blocksize: int,
                    quant_type: str, transposed: bool) -> Tensor:
    """x (rows, in) @ W[e].T per group of rows (or x (rows, out) @ W[e] when `transposed`), W the (E, out, in)
    weights bitsandbytes' dequantize_4bit(packed, absmax, blocksize, quant_type) gives; offs int32 end offsets."""
    return _grouped_mm_4bit(x, packed, absmax, offs, shape, blocksize, quant_type, transposed)


@grouped_mm_4bit.register_fake
def _(x, packed, absmax, offs, shape, blocksize, quant_type, transposed):
    return x.new_empty(x.shape[0], shape[2] if transposed else shape[1])


def _backward(ctx, grad):
    packed, absmax, offs = ctx.saved_tensors
    grad_x = torch.ops.graph_moe.grouped_mm_4bit(grad.contiguous(), packed, absmax, offs, ctx.shape, ctx.blocksize,
                                                 ctx.quant_type, not ctx.transposed)
    return grad_x, None, None, None, None, None, None, None


def _setup(ctx, inputs, output):
    _, packed, absmax, offs, ctx.shape, ctx.blocksize, ctx.quant_type, ctx.transposed = inputs
    ctx.save_for_backward(packed, absmax, offs)


grouped_mm_4bit.register_autograd(_backward, setup_context=_setup)

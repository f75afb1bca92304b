"""The grouped GEMM of frozen expert weights when each expert gets few rows (decode, short batches).

    grouped_mm_few_rows(x, b, offs) == torch._grouped_mm(x, b, offs=offs)    (b: (E, K, N), offs: int32 end offsets)

At a few rows per expert the grouped GEMM is bound by reading the weights once. torch._grouped_mm's CUTLASS tiles are
128 rows tall, mostly empty there, and it read the Qwen3-30B-A3B experts at 2.5-3.0 TB/s on an H200; the persistent
Triton kernel of triton_grouped_mm.py with 16- or 64-row tiles and four programs per SM read them at 3.2-4.4 TB/s
(benchmarks/records/h200_torch2.11_few_rows_grouped_mm_tiles.json; gate+up, ms CUTLASS -> Triton: 8 tokens 0.118
-> 0.086, 64 tokens 0.260 -> 0.187, 512 tokens 0.261 -> 0.207; from 256 rows per expert CUTLASS is as fast or
faster). The choice is made on each call from the row count, which the host knows without a sync: one compiled graph
serves every sequence length. Elsewhere (CPU, no Triton, other dtypes or sizes) the op is torch._grouped_mm.

The pass emits it only where Inductor captures CUDA graphs (passes/emit_grouped.py, `_few_rows_op_fits`). One
Qwen3-30B-A3B layer at 512 tokens on an H200, one process, the same compiled graph with the kernel and with CUTLASS
(benchmarks/kernels/few_rows_layer_ab.py; records/h200_torch2.11_qwen3_few_rows_kernel_layer_ab.json), ms waited for /
back to back: with CUDA graphs, forward 0.636 / 0.522 -> 0.557 / 0.444 (1.9x / 1.5x one read of the weights, 0.289
ms); without them, forward+backward 1.89 / 1.84 -> 2.13 / 2.10: the Triton path's host time (a launch from Python
inside the custom op: 66 us per call against 31.5 through CUTLASS; benchmarks/kernels/few_rows_host_time.py) costs
more than its GPU time saves on a host-bound layer.

Only for weights that need no gradient (frozen experts, 4-bit stacks dequantized, LoRA's base weights): the backward
is the input's gradient, the same op on b transposed. The pass emits torch._grouped_mm for trainable stacks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_grouped_mm import run_groups, unsupported

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the most rows per expert (on average) they serve best,
# chosen on an H200 (benchmarks/kernels/few_rows_grouped_mm_tiles.py); above the last, CUTLASS.
CONFIGS = ((8, (16, 256, 64, 8, 4)), (128, (64, 256, 64, 8, 4)))
PROGRAMS_PER_SM = 4  # weight-bound: more loads in flight than one program per SM keeps


def config_for(x: Tensor, b: Tensor):
    """The Triton config for these operands, or None where torch._grouped_mm runs."""
    experts, k, n = b.shape
    if not x.is_cuda or b.device != x.device or b.dtype != torch.bfloat16 or x.shape[0] == 0:
        return None
    per_expert = x.shape[0] / experts
    for most, (block_m, block_n, block_k, warps, stages) in CONFIGS:
        if per_expert <= most:
            # the widest column tile that divides N (a masked one hides the columns' contiguity from Triton)
            block_n = next((w for w in (block_n, 128, 64) if n % w == 0), None)
            if unsupported(x, k, experts, block_k) or (block_n is None and b.stride(-1) == 1):
                return None
            return block_m, block_n or 64, block_k, warps, stages
    return None


@torch.library.custom_op("graph_moe::grouped_mm_few_rows", mutates_args=())
def grouped_mm_few_rows(x: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """x (rows, K) sorted by group @ b[g] (K, N) per group of rows; offs int32 end offsets, the last one = rows."""
    if x.shape[0] == 0:  # no rows (a gradient of no rows may have zero strides, which torch._grouped_mm rejects)
        return x.new_zeros(0, b.shape[-1])
    config = config_for(x, b)
    if config is None:
        return torch._grouped_mm(x, b, offs=offs)
    y = x.new_empty(x.shape[0], b.shape[-1])
    run_groups(x, b, offs, y, 0, b.shape[0], config, PROGRAMS_PER_SM)
    return y


@grouped_mm_few_rows.register_fake
def _(x, b, offs):
    return x.new_empty(x.shape[0], b.shape[-1])


def _setup(ctx, inputs, output):
    _, b, offs = inputs
    ctx.save_for_backward(b, offs)


def _backward(ctx, grad):
    if ctx.needs_input_grad[1]:
        raise RuntimeError("graph_moe::grouped_mm_few_rows computes no weight gradient, and its weights require one: "
                           "the pass emits it only for frozen weights (a bug: please report it)")
    b, offs = ctx.saved_tensors
    return torch.ops.graph_moe.grouped_mm_few_rows(grad.contiguous(), b.transpose(-2, -1), offs), None, None


grouped_mm_few_rows.register_autograd(_backward, setup_context=_setup)

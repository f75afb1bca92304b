"""The custom ops (`graph_moe::` namespace) and Triton kernels that the rewritten graph calls, shipped as
graph_moe.kernels. The rewrite (graph_moe.passes) emits calls to them; nothing here imports the rewrite or the API.

    grouped_op.py            graph_moe::grouped_mm: what torch._grouped_mm cannot compile (float32, float16, rows
                             not in 16-byte units); its CUDA kernels in grouped_op_cuda.py
    grouped_mm_few_rows.py   graph_moe::grouped_mm_few_rows: frozen experts with few rows each (Triton on CUDA)
    grouped_mm_4bit.py       graph_moe::grouped_mm_4bit: bitsandbytes 4-bit stacks dequantized a few experts at a time
    triton_grouped_mm.py     the persistent Triton grouped GEMM the two above run
    grouped_chunks.py        torch._grouped_mm over more groups than one CUDA call takes
    row_order.py             rows between token order and expert order, and the k slots added (gathers both ways)
    swiglu.py                graph_moe::swiglu_scaled: silu(gate) * up * routing weight, one-read backward
    router_topk.py           graph_moe::router_topk: the router's top-k (Triton on CUDA)
    stack_op.py              graph_moe::stack_weights: per-expert weights stacked by one opaque op
    every_expert_marker.py   graph_moe::every_expert_as_expert_0: the mark on a loop traced with expert 0's body
    traced_bodies.py         custom ops whose bodies AOTAutograd traces into

Importing the package registers every op under torch.ops.graph_moe.
"""

from . import every_expert_marker, grouped_chunks, grouped_op, grouped_mm_4bit, grouped_mm_few_rows  # noqa: F401
from . import router_topk, row_order, stack_op, swiglu  # noqa: F401

"""graph_moe::every_expert_as_expert_0: the mark on an expert loop traced with expert 0's body alone.

The traceable forwards of graph_moe.install trace body 0 only, under graph_moe.compile, and wrap the loop's result in
this op; the pass (passes/traced_once.py) groups that body over all E experts and removes the mark. Run without the
rewrite, the op raises: a graph holding only expert 0's body never computes a wrong result.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("graph_moe::every_expert_as_expert_0", mutates_args=())
def every_expert_as_expert_0(result: Tensor, num_experts: int, stacks: list[Tensor]) -> Tensor:
    """The loop's result for all `num_experts` experts, of which the graph traced expert 0's body reading row 0 of
    each of `stacks` (the per-expert weights). Stands only until the pass rewrites the loop."""
    raise RuntimeError(
        "graph_moe: an expert loop traced with expert 0's body only ran without graph_moe's rewrite, which would "
        "compute expert 0 alone. Traced loops of one body are for graph_moe.compile's backend; please report how "
        "this graph reached another compiler.")


@every_expert_as_expert_0.register_fake
def _(result, num_experts, stacks):
    return torch.empty_like(result)


__all__ = ["every_expert_as_expert_0"]

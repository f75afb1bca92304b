"""The graph_moe pass: find unrolled expert loops, prove them, rewrite them into grouped GEMMs.

Two phases, as in Inductor's group_batch_fusion: `find_loops` groups `index_add_` chains into
candidate loops, `prove_bodies` shows the E bodies are one row-wise computation, and
`emit_grouped` replaces the loop. A loop that fails any step stays exactly as traced and is
reported with the reason.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from graph_moe.report import LoopReport

from .emit_grouped import emit
from .find_loops import LoopCandidate, find_loop_candidates
from .ops import example_value
from .prove_bodies import ProvenLoop, Unprovable, prove

log = logging.getLogger("graph_moe")


def _block_name(cand: LoopCandidate) -> str:
    stack = cand.steps[0].index_add.meta.get("nn_module_stack") or {}
    if not stack:
        return cand.accumulator.name
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['self']", "L['mod']."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    path = path.replace("._modules['", ".").replace("']", "")
    return path or "self"


def _top_k(cand: LoopCandidate):
    if cand.ids is None:
        return None
    k = example_value(cand.ids).shape[-1]  # ids are (tokens, top_k)
    return k if isinstance(k, int) else None


def _check_kernel(loop: ProvenLoop) -> None:
    """torch._grouped_mm compiles only in bf16, and needs 16-byte row strides on CUDA."""
    for g in loop.linears:
        x = example_value(g.node.args[0])
        w = example_value(g.weights[0])
        for what, t in (("rows", x), ("expert weights", w)):
            if t.dtype != torch.bfloat16:
                raise Unprovable(f"the {what} of {g.node.name} are {t.dtype}; torch._grouped_mm compiles only "
                                 "in bfloat16 (cast the model with .to(torch.bfloat16) to group this loop)")
        if w.device.type == "cuda":
            for size in (*w.shape[-2:],):
                if isinstance(size, int) and size % 8:
                    raise Unprovable(f"{g.node.name} has a dimension of {size}, not a multiple of 8: "
                                     "the CUDA grouped GEMM needs 16-byte aligned rows")


def rewrite_moe_loops(gm: fx.GraphModule, *, fuse_projections: bool = True) -> list[LoopReport]:
    """Rewrite every provable expert loop of `gm` in place; one report per loop found."""
    reports = []
    for cand in find_loop_candidates(gm.graph):
        block = _block_name(cand)
        num_experts = cand.num_experts or len(cand.steps)
        try:
            if cand.problem:
                raise Unprovable(cand.problem)
            loop = prove(cand)
            _check_kernel(loop)
            projections = emit(loop, fuse_projections=fuse_projections)
        except Unprovable as why:
            reports.append(LoopReport(block, num_experts, _top_k(cand), [], False, str(why)))
            continue
        reports.append(LoopReport(block, num_experts, _top_k(cand), projections, True))
    if any(r.rewritten for r in reports):
        gm.graph.lint()
        gm.recompile()
    return reports


__all__ = ["rewrite_moe_loops"]

"""The graph_moe pass: find unrolled expert loops, prove them, rewrite them into grouped GEMMs.

Two phases, as in Inductor's group_batch_fusion: `find_loops` groups `index_add_` chains into
candidate loops, `prove_bodies` shows the E bodies are one row-wise computation, and
`emit_grouped` replaces the loop. A loop that fails any step stays exactly as traced and is
reported with the reason.
"""

from __future__ import annotations

import logging
import os
import re

import torch.fx as fx

from graph_moe.kernels import grouped_chunks

from .emit_grouped import emit
from .find_loops import LoopCandidate, find_loop_candidates
from .ops import example_value, source_name
from .prove_bodies import ProvenLoop, Unprovable, prove
from .report import LoopReport
from .settings import RewriteSettings
from .traced_once import TraceEveryExpert, is_marker

log = logging.getLogger("graph_moe")


def _block_name(cand: LoopCandidate) -> str:
    """'model.layers.0.mlp' from Dynamo's module stack (L['self'].__dict__['_modules']['model']...)."""
    stack = cand.steps[0].index_add.meta.get("nn_module_stack") or {}
    if not stack:
        return "the compiled module (top level)"
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])?", "", list(stack.values())[-1][0])  # L['self'], L['args'][0]
    words = re.findall(r"\['([^']+)'\]|\.(\w+)|\[(\d+)\]", path)
    parts = [w for group in words for w in group if w and w not in ("_modules", "__dict__")]
    return ".".join(parts) or "self"


def _top_k(cand: LoopCandidate):
    if cand.ids is None:
        return None
    k = example_value(cand.ids).shape[-1]  # ids are (tokens, top_k)
    return k if isinstance(k, int) else None


def _readable(reason: str, graph: fx.Graph) -> str:
    """The reason with parameter placeholders named as in the model ('experts.2.up_proj.weight' for
    'l_self_modules_experts_modules_2_modules_up_proj_parameters_weight_')."""
    for node in graph.find_nodes(op="placeholder"):
        if node.name in reason and node.meta.get("grapharg") is not None:
            reason = re.sub(rf"\b{re.escape(node.name)}\b", source_name(node), reason)
    return reason


def _chunk_note(cand: LoopCandidate, num_experts: int) -> str:
    """' (...)' when the grouped GEMMs of this loop run as several calls (grouped_chunks.MAX_GROUPS), else ''."""
    ids = example_value(cand.ids)
    limit = grouped_chunks.MAX_GROUPS.get(ids.device.type) if ids is not None else None
    if limit is None or num_experts <= limit:
        return ""
    calls = -(-num_experts // limit)
    return (f" (each torch._grouped_mm as {calls} calls of at most {limit} experts: the {ids.device.type} kernel "
            f"takes fewer than {limit + 1} groups)")


def _prove(cand: LoopCandidate) -> ProvenLoop:
    """prove(), with any unexpected error turned into a skip: a pass bug must never break a user's compile."""
    try:
        return prove(cand)
    except Unprovable:
        raise
    except Exception as e:
        if os.environ.get("GRAPH_MOE_DEBUG"):
            raise
        raise Unprovable(f"internal error while proving the loop ({e!r}); please report it") from e


def rewrite_moe_loops(gm: fx.GraphModule, settings: RewriteSettings = RewriteSettings()) -> list[LoopReport]:
    """Rewrite every provable expert loop of `gm` in place, as `settings` say; one report per loop found."""
    reports = []
    # The loop may sit in a higher-order op's body (a checkpointed decoder layer, as transformers 5 traces it:
    # tag_activation_checkpoint over the submodule wrap_body_0), not in the graph itself.
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            found = _rewrite_graph(module, settings)
            for report in found:
                report.in_subgraph = module is not gm
            reports += found
    return reports


def _rewrite_graph(gm: fx.GraphModule, settings: RewriteSettings):
    reports = []
    for cand in find_loop_candidates(gm.graph):
        block = _block_name(cand)
        num_experts = cand.num_experts or len(cand.steps)
        try:
            if cand.problem:
                raise Unprovable(cand.problem)
            loop = _prove(cand)
            gemms = emit(loop, settings)
        except Unprovable as why:
            if cand.marker is not None:  # expert 0's body alone: never left as traced (traced_once.py)
                raise TraceEveryExpert(f"{block}: {_readable(str(why), gm.graph)}") from why
            reports.append(LoopReport(block, num_experts, _top_k(cand), [], False, _readable(str(why), gm.graph)))
            continue
        projections = [name for name, _ in gemms]
        slow = sum(fallback for _, fallback in gemms)
        if slow:
            projections[-1] += (f" ({slow} of {len(gemms)} as graph_moe::grouped_mm: not bfloat16 or not 16-byte "
                                "aligned; a Triton kernel on CUDA, one matmul per expert elsewhere)")
        chunks = _chunk_note(cand, num_experts)
        if chunks and slow < len(gemms):
            projections[-1] += chunks
        reports.append(LoopReport(block, num_experts, _top_k(cand), projections, True,
                                  traced_once=cand.marker is not None))
    if any(is_marker(n) for n in gm.graph.nodes):
        raise TraceEveryExpert("an expert loop traced once was not found as a loop (index_add_ chain) by the pass")
    if any(r.rewritten for r in reports):
        gm.graph.lint()
        gm.recompile()
    return reports


__all__ = ["rewrite_moe_loops", "RewriteSettings", "TraceEveryExpert", "LoopReport"]

"""What the pass did to one expert loop (`LoopReport`), and what a user can do about each reason a loop is left as
traced (`HINTS`). graph_moe/report.py feeds the compile counters and logs from these reports.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass
class LoopReport:
    """One expert loop found in one captured graph."""

    block: str  # where the loop lives, from Dynamo's module stack (e.g. "model.layers[0].mlp")
    num_experts: int
    top_k: int | None
    projections: list[str]  # grouped GEMMs emitted, e.g. ["gate_proj+up_proj", "down_proj"]
    rewritten: bool
    reason: str = ""  # why the loop was left as traced; empty when rewritten
    hint: str = ""  # what the user can do about it; filled from the reason when not given
    traced_once: bool = False  # Dynamo traced expert 0's body alone, standing for every expert (passes/traced_once.py)
    in_subgraph: bool = False  # in a higher-order op's body (a checkpointed layer, a shared block trace)

    def __post_init__(self):
        if not self.rewritten and not self.hint:
            self.hint = hint_for(self.reason)

    def __str__(self) -> str:
        head = f"{self.block}: {self.num_experts} experts, top-{self.top_k}"
        if self.rewritten:
            once = " (expert 0's body traced for all)" if self.traced_once else ""
            return f"{head} -> grouped GEMMs [{', '.join(self.projections)}]{once}"
        return f"{head} -> left as traced: {self.reason} (hint: {self.hint})"


# What a user can do about each reason a loop is left as traced (find_loops.py, prove_bodies.py,
# emit_grouped.py, __init__.py), matched on the reason's wording; the first match wins. The loop then
# runs exactly as traced: correct, only not grouped.
_HETEROGENEOUS = ("the experts are not one computation (another class, size or activation, or a hook on some "
                  "experts only): make them identical, or leave this block out with "
                  "graph_moe.install(model, filter_fn=...) and compile it as it is")
_NOT_ROW_WISE = ("each routed row must be computed on its own: element-wise ops, nn.Linear/x @ w on per-expert "
                 "weights, reshapes that keep the rows first; move this op out of the expert, or, if it does act "
                 "row by row, report it so graph_moe learns it")
HINTS: list[tuple[str, str]] = [
    (r"internal error", "a graph_moe bug, not a problem with the model: rerun with GRAPH_MOE_DEBUG=1 to get the "
                        "traceback and report it"),
    (r"traced once|one row per expert",
     "graph_moe.compile traced expert 0's body alone for this loop (passes/traced_once.py) and traces every body again "
     "by itself; graph_moe.compile(model, trace_experts_once=False) skips that first try. Please report the reason"),
    (r"alpha=", "scale the rows before index_add_ (rows * alpha) instead of passing alpha="),
    (r"index_add_ index is not torch\.where|torch\.where of expert \w+ is used as a whole",
     "write the loop as `idx, top_x = torch.where(expert_mask[e])` ... `final.index_add_(0, top_x, rows)`, the form "
     "of graph_moe.install's traceable forwards"),
    (r"index_add_ along dim", "flatten the tokens and accumulate (tokens, hidden) rows along dim 0"),
    (r"different expert masks|expert mask|one_hot has no static|expert ids are not",
     "build the mask as F.one_hot(selected_experts, num_classes=num_experts).permute(2, 1, 0) from (tokens, top_k) "
     "ids, with num_experts a Python int, as transformers' MoE blocks do"),
    (r"the loop runs experts", "loop over every expert (for e in range(num_experts)), not only the experts that got "
                               "tokens; graph_moe.install(model) gives supported blocks such a forward"),
    (r"outside the loop", "keep each expert's values inside its iteration: compute auxiliary values (losses, "
                          "statistics) from the router's outputs, or outside the compiled region"),
    (r"shared or read across experts|belongs to the bodies of experts|a value of another expert's iteration",
     "each expert must read only its own weights and values: clone a weight shared by some experts (or share it "
     "with all of them), and do not read another expert's modules"),
    (r"different devices|device\(|'(cuda|cpu|meta|xpu|mps)(:\d+)?'",
     "keep every expert of a block on one device: move the whole block with .to(device), or use a device_map that "
     "does not split a MoE block"),
    (r"different dtype", "give every expert of a block the same dtype: cast the whole block with .to(dtype)"),
    (r"differs from expert 0|body has \w+ ops|adds its rows at a different torch\.where output", _HETEROGENEOUS),
    (r"static count", "nothing to gain: the batch had no tokens (or a fixed row count), so there is nothing to group; "
                      "batches with tokens compile a graph of their own and are rewritten"),
    (r"no per-expert linear layer", "the experts have no weights of their own that a grouped GEMM could take (no "
                                    "nn.Linear or x @ w on per-expert weights, e.g. quantized layers): nothing to "
                                    "group"),
    (r"graph input|may alias other tensors", "accumulate into a fresh tensor made in the forward, e.g. "
                                             "final = torch.zeros_like(hidden_states)"),
    (r"reads the accumulator in the middle|view of the accumulator taken before",
     "read the accumulator only after the loop"),
    (r"writes to a tensor in the middle of the loop", "keep in-place updates other than the index_add_ out of the "
                                                      "loop (before or after it)"),
    (r"accumulator .* does not match the combined rows|not laid out row-major",
     "add (rows, hidden) rows, cast to the accumulator's dtype, into a (tokens, hidden) accumulator"),
    (r"fused projections with and without bias", "pass fuse_projections=False (graph_moe.make_backend or "
                                                 "graph_moe.inductor_pass), or give both projections a bias or none"),
    (r"no fake tensors", "run the pass through torch.compile (graph_moe.backend), whose graphs carry fake tensors"),
    (r"\(\w+\): ", _NOT_ROW_WISE),  # the row-by-row check: '<node> (<op>): <why>'
]
GENERIC_HINT = ("see graph_moe.explain(model, inputs) and the README's 'What is supported'; the loop runs as traced, "
                "with correct results")


def hint_for(reason: str) -> str:
    """What the user can do about a loop left as traced for `reason`."""
    for pattern, hint in HINTS:
        if re.search(pattern, reason):
            return hint
    return GENERIC_HINT


__all__ = ["LoopReport", "HINTS", "GENERIC_HINT", "hint_for"]

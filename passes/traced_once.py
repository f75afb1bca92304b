"""An expert loop traced once: expert 0's body standing for all E, when that is true by construction.

Dynamo's trace of the unrolled loop costs ~50 ms per expert (each body's ops carry their own unbacked row count, and
every op's shapes go through sympy): 7 of the 14 s that a 128-expert layer takes to compile on an H200's host. When
the experts are laid out (layout.py) and carry no per-expert state, body e is graph_moe's own code reading row e of
the layout's stacks, so it is body 0 with `stack[0]` read as `stack[e]`. `graph_moe.compile` then traces body 0 only
and marks the loop's result with `graph_moe::every_expert_as_expert_0(result, E)`:

    idx, top_x = torch.where(expert_mask[0]);  ... body 0 ...;  acc.index_add_(0, top_x, rows)
    out = torch.ops.graph_moe.every_expert_as_expert_0(acc, E)

The pass proves the one body row-wise as usual, reads each per-expert input as a slice `stack[0]` of an E-row stack,
and emits the grouped loop over all E experts. What it cannot rewrite raises `TraceEveryExpert`, and
`graph_moe.compile` traces that region again with every body (compile.py). The marker (graph_moe/kernels/every_expert_marker.py),
run without the rewrite, raises: a graph holding only expert 0's body never computes a wrong result.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graph_moe.kernels import every_expert_marker  # noqa: F401  (registers the marker op)

from .ops import example_value, slice_source


class TraceEveryExpert(Exception):
    """A loop traced once cannot be rewritten; the message says why. Its region must be traced with every body."""


def marker_of(step_result: fx.Node, accumulator: fx.Node) -> fx.Node | None:
    """The every_expert_as_expert_0 node reading the loop's result (the accumulator, or the last out-of-place
    index_add), or None."""
    for node in (step_result, accumulator):
        for user in node.users:
            if is_marker(user):
                return user
    return None


def is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.graph_moe.every_expert_as_expert_0,
                                                          torch.ops.graph_moe.every_expert_as_expert_0.default)


def remove_marker(marker: fx.Node) -> None:
    """After the rewrite: the marker's readers read the rewritten result it was given."""
    marker.replace_all_uses_with(marker.args[0])
    marker.graph.erase_node(marker)


def slices_of_every_expert(slice_node: fx.Node, num_experts: int) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """For `stack[0]` (or `stack[0].to(...)`) read by the one traced body: the nodes `stack[e]` for every e, the new
    ones placed after it, and the nodes made (the emit takes the stack whole; they go with the loop). None when the
    stack does not have one row per expert."""
    source = slice_source(slice_node)
    if source is None or source[1] != 0:
        raise AssertionError(f"{slice_node.name} is not row 0 of a stack")
    stack, _, cast = source
    val = example_value(stack)
    if not (isinstance(val, torch.Tensor) and statically_known_true(val.shape[0] == num_experts)):
        return None
    row0 = cast.args[0] if cast is not None else slice_node
    graph, fake_mode = slice_node.graph, getattr(val, "fake_mode", None)
    nodes, made, anchor = [slice_node], [], slice_node
    for e in range(1, num_experts):
        with graph.inserting_after(anchor):
            row = graph.call_function(row0.target, (stack, e)) if row0.op == "call_function" else \
                graph.call_method(row0.target, (stack, e))
        with fake_mode:
            row.meta["example_value"] = val[e]
        anchor = row
        made.append(row)
        if cast is not None:
            with graph.inserting_after(anchor):
                row = graph.node_copy(cast, lambda n: row if n is row0 else n)
            row.meta["example_value"] = example_value(cast)  # shape, dtype and device are all the emit reads
            anchor = row
            made.append(row)
        nodes.append(row)
    return nodes, made


__all__ = ["TraceEveryExpert", "is_marker", "marker_of", "remove_marker",
           "slices_of_every_expert"]

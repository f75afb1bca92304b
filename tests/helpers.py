"""Shared checks: compile through graph_moe, keep the rewritten graphs, compare with eager."""

from __future__ import annotations

import torch

from graph_moe import make_backend
from torch._dynamo.backends.registry import lookup_backend


class Recorder:
    """A graph_moe backend that keeps every rewritten graph and runs it through `inner`."""

    def __init__(self, inner="aot_eager", **options):
        self.graphs, self.reports = [], []

        def keep(gm, example_inputs, **kw):
            self.graphs.append(gm)
            return lookup_backend(inner)(gm, example_inputs)

        self.backend = make_backend(keep, on_reports=self.reports.extend, **options)

    def count(self, *names) -> int:
        return sum(1 for g in self.graphs for n in g.graph.nodes
                   if n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target) in names)


def assert_close_bf16(a, b, what=""):
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{what}: {m}")


def grads(module, *inputs):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()] + \
        [x.grad.clone() for x in inputs if x.grad is not None]

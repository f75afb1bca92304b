"""`graph_moe.explain`: which expert loops were found, rewritten or left, and why."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from graph_moe.backend import make_backend
from graph_moe.compile import capture_settings
from graph_moe.install import InstallReport, install, uninstall
from graph_moe.report import LoopReport


@dataclasses.dataclass
class Explanation:
    install: InstallReport
    loops: list[LoopReport]

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten for r in self.loops)

    def __str__(self) -> str:
        lines = ["MoE blocks:", str(self.install), "", f"Expert loops in the captured graphs ({len(self.loops)}):"]
        lines += [f"  {r}" for r in self.loops] or ["  none: no graph held an unrolled expert loop"]
        lines.append(f"{self.rewritten} of {len(self.loops)} loop(s) rewritten into grouped GEMMs")
        return "\n".join(lines)


def explain(model: nn.Module, *example_inputs, **example_kwargs) -> Explanation:
    """Trace `model` on the example inputs (no Inductor, no gradients) and report every expert loop.

    Blocks not yet installed are installed for the trace and restored afterwards.
    """
    already = {id(m) for m in model.modules() if getattr(m, "_graph_moe_installed", None)}
    report = install(model)
    loops: list[LoopReport] = []
    backend = make_backend("eager", on_reports=loops.extend)
    try:
        with capture_settings(), torch.no_grad():
            torch.compile(model, backend=backend)(*example_inputs, **example_kwargs)
    finally:
        if not already:
            uninstall(model)
    return Explanation(report, loops)

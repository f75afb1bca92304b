"""graph_moe: rewrite the expert loops of Mixture-of-Experts models into grouped GEMMs under torch.compile.

    torch.compile(model, backend=graph_moe.backend)   # after graph_moe.install(model)
    graph_moe.compile(model)                          # install + settings + regional compile
    graph_moe.explain(model, input_ids)               # what was found, rewritten or left, and why
"""

from graph_moe.backend import backend, make_backend
from graph_moe.compile import capture_settings, compile
from graph_moe.explain import Explanation, explain
from graph_moe.install import InstallReport, install, uninstall
from graph_moe.report import LoopReport, counter_snapshot

__all__ = ["backend", "make_backend", "compile", "capture_settings", "explain", "Explanation", "install",
           "uninstall", "InstallReport", "LoopReport", "counter_snapshot"]

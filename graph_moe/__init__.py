"""graph_moe: rewrite the expert loops of Mixture-of-Experts models into grouped GEMMs under torch.compile.

    torch.compile(model, backend=graph_moe.backend)   # after graph_moe.install(model)
    graph_moe.compile(model)                          # install + settings + regional compile
    graph_moe.explain(model, input_ids)               # what was found, rewritten or left, and why
"""

import os as _os

# From a source checkout that is not installed (PYTHONPATH=.), find graph_moe.passes in ../passes, where
# the installed package gets it through setuptools' package-dir mapping.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "passes")) and _os.path.isdir(_os.path.join(_root, "passes")):
    __path__.append(_root)

from graph_moe.backend import backend, make_backend  # noqa: E402
from graph_moe.compile import capture_settings, compile
from graph_moe.explain import Explanation, explain
from graph_moe.inductor_pass import GraphMoePass, inductor_options, inductor_pass
from graph_moe.install import InstallReport, install, uninstall
from graph_moe.report import LoopReport, counter_snapshot

__all__ = ["backend", "make_backend", "compile", "capture_settings", "explain", "Explanation", "install",
           "uninstall", "InstallReport", "LoopReport", "counter_snapshot", "inductor_pass", "inductor_options",
           "GraphMoePass"]

"""graph_moe: rewrite the expert loops of Mixture-of-Experts models into grouped GEMMs under torch.compile.

    torch.compile(model, backend=graph_moe.backend)   # after graph_moe.install(model)
    graph_moe.compile(model)                          # install + settings + regional compile
    graph_moe.explain(model, input_ids)               # what was found, rewritten or left, and why
"""

import importlib.util as _util
import os as _os
import sys as _sys

# From a source checkout that is not installed (PYTHONPATH=.), load graph_moe.passes from ../passes; installs
# (editable or not) get it through setuptools' package-dir mapping. The checkout root never goes on __path__: it holds
# graph_moe/ itself, and torch walks this package's submodules when TORCH_LOGS names graph_moe.
_passes = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "passes")
if _util.find_spec("graph_moe.passes") is None and _os.path.isfile(_os.path.join(_passes, "__init__.py")):
    _spec = _util.spec_from_file_location("graph_moe.passes", _os.path.join(_passes, "__init__.py"),
                                          submodule_search_locations=[_passes])
    _sys.modules["graph_moe.passes"] = passes = _util.module_from_spec(_spec)
    _spec.loader.exec_module(passes)

from graph_moe.backend import backend, make_backend  # noqa: E402
from graph_moe.compile import capture_settings, compile  # noqa: E402
from graph_moe.tools.dump import DumpIndex, dump  # noqa: E402
from graph_moe.experts_4bit import quantize_experts_4bit  # noqa: E402
from graph_moe.explain import Explanation, explain  # noqa: E402
from graph_moe.inductor_pass import GraphMoePass, inductor_options, inductor_pass  # noqa: E402
from graph_moe.install import InstallReport, install, uninstall  # noqa: E402
from graph_moe.passes import RewriteSettings  # noqa: E402
from graph_moe.report import LoopReport, counter_snapshot  # noqa: E402

__all__ = ["backend", "make_backend", "compile", "capture_settings", "explain", "Explanation", "dump", "DumpIndex",
           "install", "uninstall", "InstallReport", "LoopReport", "counter_snapshot", "inductor_pass", "inductor_options",
           "GraphMoePass", "RewriteSettings", "quantize_experts_4bit", "GraphMoeCallback"]


def __getattr__(name):
    # imported on first use: the Trainer callback needs transformers' Trainer, slow to import
    if name == "GraphMoeCallback":
        from graph_moe.integrations.trainer import GraphMoeCallback

        return GraphMoeCallback
    raise AttributeError(f"module 'graph_moe' has no attribute {name!r}")

"""graph_moe as an Inductor pre-grad pass, for the plain `inductor` backend.

    torch.compile(model, options=graph_moe.inductor_options())

Inductor's `pre_grad_custom_pass` hook sees the Dynamo torch-level graph, the same IR the graph_moe
backend rewrites, so the pass is `rewrite_moe_loops` on the hook's graph. It is a `CustomGraphPass`
with a `uuid()`, which is what makes it cache-safe:

- torch <= 2.11: Inductor runs pre-grad passes before the AOTAutograd cache lookup, on every
  compile; the cache keys are computed from the rewritten graph.
- torch >= 2.12 (`pre_grad_pass_timing="default"` resolves to "late" when every pre-grad pass has a
  uuid): the pass runs only on a cache miss, after the lookup; its uuid is part of the FX-graph
  cache key. On a warm cache the pass does not run at all, so the `graph_moe` counters are not fed
  on a hit: the cached artifact already holds the rewrite. If a composed pass has no uuid, ours
  returns None too and Inductor falls back to "early" timing (pass runs on every compile, keys from
  the rewritten graph).

The uuid hashes the source of every module of `graph_moe.passes` and `graph_moe.kernels` and of this
file, plus the settings, plus the uuid of a composed pass: a change to any of them is a cache miss.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import graph_moe.kernels as _kernels_pkg
import graph_moe.passes as _passes_pkg
from graph_moe.backend import fake_tensor_cache_back_on
from graph_moe.passes import RewriteSettings, rewrite_moe_loops
from graph_moe.report import LoopReport, record

def _source_files() -> tuple[str, ...]:
    """Every .py file of the graph_moe.passes and graph_moe.kernels packages (recursively), then this file; sorted,
    absolute."""
    files = []
    for root in (*_passes_pkg.__path__, *_kernels_pkg.__path__):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return tuple(sorted(os.path.abspath(f) for f in files)) + (os.path.abspath(__file__),)


def _as_passes(then) -> tuple[Callable, ...]:
    if then is None:
        return ()
    if isinstance(then, (list, tuple)):
        out = []
        for p in then:
            out.extend(_as_passes(p))
        return tuple(out)
    if not callable(then):
        raise TypeError(f"graph_moe: then= must be a graph pass (callable on a torch.fx.Graph), not {then!r}")
    return (then,)


def _pass_uuid(p) -> Any | None:
    if isinstance(p, CustomGraphPass):
        return p.uuid()
    return None  # a plain callable: nothing to key the cache on


class GraphMoePass(CustomGraphPass):
    """Inductor `pre_grad_custom_pass` running the graph_moe rewrite, then an optional user pass.

    settings: the rewrite's `graph_moe.RewriteSettings`; rewrite_options: any of its fields as keywords, replacing
        the settings' (fuse_projections=False, ...).
    then: a pass (or list of passes) run after ours on the same graph; its uuid is folded into ours
        (None if it has none, which makes Inductor run the pre-grad passes before its cache lookup).
    on_reports: called with the LoopReports of every graph the pass rewrites (not part of the uuid).
    """

    def __init__(self, *, settings: RewriteSettings | None = None, then=None,
                 on_reports: Callable[[list[LoopReport]], Any] | None = None, **rewrite_options):
        self.settings = RewriteSettings.of(settings, **rewrite_options)
        self.then = _as_passes(then)
        self.on_reports = on_reports

    @property
    def fuse_projections(self) -> bool:
        return self.settings.fuse_projections

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        if not isinstance(gm, fx.GraphModule):
            raise TypeError("graph_moe: the pre-grad pass needs a torch.fx.Graph owned by a GraphModule "
                            f"(got owning_module={type(gm).__name__})")
        fake_tensor_cache_back_on()  # AOTAutograd, after this pass, traces the small rewritten graph
        reports = rewrite_moe_loops(gm, self.settings)
        if any(r.rewritten for r in reports):
            gm.recompile()  # rewrite_moe_loops recompiles too; cheap, and keeps gm.forward in step with graph
        record(reports)
        if self.on_reports is not None:
            self.on_reports(reports)
        for p in self.then:
            p(graph)

    def uuid(self) -> str | None:
        own = get_hash_for_files(_source_files(), extra=repr(sorted(self.settings.as_dict().items()))).hex()
        if not self.then:
            return f"graph_moe:{own}"
        theirs = [_pass_uuid(p) for p in self.then]
        if any(u is None for u in theirs):
            return None
        return f"graph_moe:{own}+" + hashlib.sha256(repr(theirs).encode()).hexdigest()

    def __deepcopy__(self, memo):
        # Inductor deep-copies its config (torch.compile's option check does): keep one pass object,
        # so on_reports and composed passes are the caller's own, not copies.
        return self

    def __repr__(self) -> str:
        then = f", then={list(self.then)!r}" if self.then else ""
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.as_dict().items())
        return f"GraphMoePass({settings}{then})"


def inductor_pass(*, settings: RewriteSettings | None = None, then=None,
                  on_reports: Callable[[list[LoopReport]], Any] | None = None, **rewrite_options) -> GraphMoePass:
    """The graph_moe rewrite as an Inductor `pre_grad_custom_pass` (see GraphMoePass)."""
    return GraphMoePass(settings=RewriteSettings.of(settings, **rewrite_options), then=then, on_reports=on_reports)


def _without_graph_moe(current) -> Any:
    """The user's passes in `current`, minus any GraphMoePass already there (so options don't stack ours twice)."""
    if isinstance(current, GraphMoePass):
        return list(current.then) or None
    if isinstance(current, (list, tuple)):
        kept = []
        for p in current:
            kept.extend(_as_passes(_without_graph_moe(p)))
        return kept or None
    return current


def inductor_options(*, settings: RewriteSettings | None = None, then=None,
                     on_reports: Callable[[list[LoopReport]], Any] | None = None, **rewrite_options) -> dict[str, Any]:
    """`torch.compile(..., options=...)` for the plain inductor backend: our pre-grad pass, composed with
    `then` or else with whatever `torch._inductor.config.pre_grad_custom_pass` holds now (which
    `options=` would otherwise replace while compiling)."""
    if then is None:
        then = _without_graph_moe(torch._inductor.config.pre_grad_custom_pass)
    return {"pre_grad_custom_pass": inductor_pass(settings=RewriteSettings.of(settings, **rewrite_options), then=then,
                                                   on_reports=on_reports)}


def add_global_inductor_pass(settings: RewriteSettings | None = None, **rewrite_options) -> None:
    """Put the graph_moe pass into the global Inductor config, composed with any pass already there (once).

    For stacks that compile with Inductor and options that cannot carry a pass (Unsloth compiles whole decoder layers
    with a fixed options dict; accelerate's dynamo plugin): the global `pre_grad_custom_pass` is read by every
    Inductor compile, so an MoE block traced inside their compiled regions is rewritten there too.
    """
    settings = RewriteSettings.of(settings, **rewrite_options)
    torch._inductor.config.pre_grad_custom_pass = inductor_options(settings=settings)["pre_grad_custom_pass"]


__all__ = ["GraphMoePass", "inductor_pass", "inductor_options", "add_global_inductor_pass"]

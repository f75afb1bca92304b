"""The `torch.compile` backend: run the graph_moe pass on each captured graph, then an inner compiler."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch._inductor.config
from torch._dynamo.backends import registry

from graph_moe.passes import RewriteSettings, rewrite_moe_loops
from graph_moe.report import LoopReport, record

log = logging.getLogger("graph_moe")

INNER = ("inductor", "aot_eager", "eager")


def _inductor_patches(mode: str | None, options: dict | None) -> dict:
    """The Inductor config `torch.compile(mode=..., options=...)` sets."""
    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(options or {})
    return patches


def _inductor(gm, example_inputs, mode: str | None, options: dict | None):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=_inductor_patches(mode, options))


def run_inner(inner: str | Callable, gm, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """Compile the (rewritten) graph with the inner compiler: a name in INNER or a backend callable."""
    if callable(inner):  # a backend gets mode=/options= only when torch.compile or make_backend set them
        extra = {k: v for k, v in (("mode", mode), ("options", options)) if v}
        return inner(gm, example_inputs, **extra)
    if inner == "inductor":
        return _inductor(gm, example_inputs, mode, options)
    return registry.lookup_backend(inner)(gm, example_inputs)


def fake_tensor_cache_back_on(example_inputs=None):
    """The capture settings trace without the fake-tensor cache (it misses on the unrolled bodies, compile.py);
    the rewritten graph is small and AOTAutograd and Inductor hit it often: on again for them, on Dynamo's fake
    mode, which they reuse (the backward's lazy compile included)."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is not None:
        fake_mode.cache_enabled = not fake_mode.propagate_real_tensors


def _warn_if_router_without_loop(gm: torch.fx.GraphModule) -> None:
    """A router (one_hot of the top-k ids) with no loop after it: the loop ran in Python, outside any graph."""
    if any(getattr(n.target, "__name__", None) == "one_hot" for n in gm.graph.nodes):
        log.warning("graph_moe: this graph routes tokens to experts but holds no expert loop; the loop runs "
                    "eagerly between graphs. Call graph_moe.install(model) before torch.compile (or use "
                    "graph_moe.compile(model)) and compile under graph_moe.capture_settings().")


def _warn_if_ddp_splits(reports) -> None:
    """Loops left as traced under DDP with Dynamo's DDPOptimizer on: it cut the graph at gradient buckets, and so
    the expert loop, before this backend saw it."""
    if all(r.rewritten for r in reports) or not torch._dynamo.config.optimize_ddp:
        return
    from torch.nn.parallel import DistributedDataParallel

    if DistributedDataParallel._get_active_ddp_module() is not None:
        log.warning("graph_moe: under DDP, Dynamo's DDPOptimizer splits each graph at gradient buckets, which "
                    "cuts expert loops apart; set torch._dynamo.config.optimize_ddp = False (graph_moe.compile "
                    "and graph_moe.capture_settings() do) and compile per decoder layer.")


def make_backend(inner: str | Callable = "inductor", *, mode: str | None = None, options: dict | None = None,
                 settings: RewriteSettings | None = None, on_reports: Callable[[list[LoopReport]], Any] | None = None,
                 **rewrite_options):
    """Build a graph_moe backend.

    inner: "inductor" (default), "aot_eager", "eager", or any backend callable, run on the rewritten graph.
    mode/options: Inductor's `torch.compile(mode=..., options=...)`; those given to torch.compile win.
    settings: the rewrite's `graph_moe.RewriteSettings` (default: its defaults); rewrite_options: any of its fields
        as keywords, replacing the settings' (fuse_projections=False, router_topk=False, low_memory_4bit=False).
    on_reports: called with the LoopReports of every captured graph (graph_moe.explain uses it).
    """
    settings = RewriteSettings.of(settings, **rewrite_options)
    if isinstance(inner, str) and inner not in INNER:
        raise ValueError(f"graph_moe: inner compiler must be one of {INNER} or a backend callable, not {inner!r}")

    def graph_moe_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        mode_, options_ = kwargs.get("mode", mode), {**(options or {}), **(kwargs.get("options") or {})}
        # the rewrite sees the Inductor config the graph compiles under (as a pass inside Inductor does): under CUDA
        # graphs it emits kernels whose host cost the graphs remove (graph_moe/kernels/grouped_mm_few_rows.py)
        with torch._inductor.config.patch(_inductor_patches(mode_, options_) if inner == "inductor" else {}):
            reports = rewrite_moe_loops(gm, settings)
        record(reports)
        if not reports:
            _warn_if_router_without_loop(gm)
        _warn_if_ddp_splits(reports)
        if on_reports is not None:
            on_reports(reports)
        fake_tensor_cache_back_on(example_inputs)
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=True):  # and for any fake mode they make
            return run_inner(inner, gm, example_inputs, mode=mode_, options=options_)

    graph_moe_backend.inner = inner
    graph_moe_backend.settings = settings
    return graph_moe_backend


backend = make_backend()
backend.__name__ = "graph_moe"

# Registered on import for `backend="graph_moe"`; the `torch_dynamo_backends` entry point finds it
# without an import, and torch registers it itself then (registering twice would raise).
if registry._BACKENDS.get("graph_moe") is None and "graph_moe" not in registry._COMPILER_FNS:
    registry.register_backend(backend, name="graph_moe")

"""Shared checks: compile through graph_moe, keep the rewritten graphs, compare with eager."""

from __future__ import annotations

import copy

import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import graph_moe
from graph_moe import make_backend
from graph_moe.layout import layout_of
from graph_moe.stacked_adapters import split_stacked
from graph_moe.stacked_experts import split_stacked_experts


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


class Keep:
    """An inner compiler for graph_moe.compile that keeps each (rewritten) graph it is given."""

    def __init__(self, inner="aot_eager"):
        self.graphs, self.inner = [], inner

    def __call__(self, gm, example_inputs, **kw):
        self.graphs.append(gm)
        return lookup_backend(self.inner)(gm, example_inputs)

    def count(self, name):
        """Nodes calling `name` in the kept graphs, the bodies of their higher-order ops included (a checkpointed
        layer's loop sits in one)."""
        return sum(1 for g in self.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes if getattr(n.target, "__name__", n.target) == name)


def loss_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    # Stacked LoRA adapters and expert weights (graph_moe/stacked_*.py) under their per-expert names, to compare with
    # eager.
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), split_stacked_experts(split_stacked(grads), model)


def check_model_rewritten(model, *, blocks, loops=None, vocab=64, regional=True, grouped_per_loop=2, eval_mode=False,
                          seq_len=7):
    """graph_moe.compile(model) installs `blocks` MoE blocks, rewrites `loops` loops (default: 1 regional,
    `blocks` whole) with `grouped_per_loop` grouped GEMMs each and no index_add_ left, and logits and every
    gradient equal an untouched eager copy's on fresh random tokens. Returns the Keep with the graphs."""
    reference = copy.deepcopy(model)
    if eval_mode:
        model.eval(), reference.eval()
    keep = Keep()
    graph_moe.compile(model, inner=keep, regional=regional)
    report = model._graph_moe_install_report
    assert report.num_installed == blocks, str(report)
    assert all(isinstance(b.num_experts, int) and isinstance(b.top_k, int) for b in report.blocks), str(report)
    ids = torch.randint(0, vocab, (2, seq_len))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    logits, grads = loss_and_grads(model, ids)
    loops = loops if loops is not None else (1 if regional else blocks)
    assert counters["graph_moe"]["loops_skipped"] == 0, dict(counters["graph_moe"])
    assert counters["graph_moe"]["loops_rewritten"] == loops, dict(counters["graph_moe"])
    assert keep.count("_grouped_mm") + keep.count("grouped_mm") == grouped_per_loop * loops
    assert keep.count("index_add_") == 0
    assert_close_bf16(logits, ref_logits, "logits")
    assert grads.keys() == ref_grads.keys()
    assert_grads_close(grads, ref_grads)
    if regional:  # graph_moe.compile read each laid-out block's facts in plain Python (graph_moe/layout_check.py)
        for module in model.modules():
            layout = layout_of(module)
            assert layout is None or layout.checked is not None, f"{type(module).__name__}: layout not checked"
    return keep


def assert_training_tracks_eager(model, reference, *, steps=3, tolerance=2e-2):
    """A few AdamW steps on the trainable parameters of `model` (compiled) and `reference` (eager), same tokens:
    the losses stay within `tolerance` (relative, at least absolute for losses below 1)."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, reference)]
    ids = torch.randint(0, 64, (2, 6))
    for _ in range(steps):
        losses = []
        for m, opt in zip((model, reference), opts):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < tolerance * max(1.0, abs(losses[1])), losses


def assert_close_bf16(a, b, what=""):
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{what}: {m}")


def assert_grads_close(grads: dict, ref_grads: dict):
    """Every gradient of the reference (eager) has its counterpart in `grads`, equal within bf16 tolerance."""
    for name in ref_grads:
        assert_close_bf16(grads[name], ref_grads[name], name)


def grads(module, *inputs):
    return [p.grad.clone() if p.grad is not None else None for p in module.parameters()] + \
        [x.grad.clone() for x in inputs if x.grad is not None]


def evaluated_guards(model) -> int:
    """How many guards Dynamo evaluates on a call of `model`'s compiled code: the leaf guards in the guard trees of
    every cache entry of every forward its modules' classes define (one guard per fact, however often the trace read
    it), counted in the tree as Dynamo prints it (a dict's keys and values sit in managers of their own)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = {type(m).forward.__code__ for m in model.modules() if hasattr(type(m).forward, "__code__")}
    trees = [str(entry.guard_manager) for code in codes for entry in _debug_get_cache_entry_list(code)]
    return sum(1 for tree in trees for line in tree.splitlines() if "+- " in line and "Manager" not in line)


def compile_by(way: str, model, inner: str = "aot_eager"):
    """`model` compiled the two ways users do: "graph_moe.compile" (in place, per decoder layer; returns `model`) or
    "torch.compile" (install, then the whole model with graph_moe's backend; call it under capture_settings)."""
    if way == "graph_moe.compile":
        return graph_moe.compile(model, inner=inner)
    graph_moe.install(model)
    return torch.compile(model, backend=make_backend(inner))


class TokenRows(torch.utils.data.Dataset):
    """Token rows for the HF Trainer, each its own label."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}

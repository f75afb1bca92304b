"""Find unrolled expert loops: chains of `index_add_` into one accumulator, one link per expert.

An unrolled range loop (transformers' OLMoE form, and what `graph_moe.install` gives other models)
looks like this in a Dynamo graph, once per expert e:

    mask_e      = expert_mask[e]                  expert_mask = one_hot(ids, E).permute(...)
    where_e     = torch.where(mask_e)             -> (coords along dim a, coords along dim b)
    ...body_e...                                  gathers rows, runs expert e, scales by routing weight
    acc.index_add_(0, where_e[j], y_e)

This module only finds the chains and the routing that drives them; `prove_bodies` decides
whether the E bodies are the same computation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .ops import INDEX_ADD, example_value, is_getitem, op_name
from .traced_once import marker_of


@dataclasses.dataclass
class ExpertStep:
    """One unrolled iteration: expert `expert`'s contribution `source` added at `index`."""

    expert: int
    where: fx.Node  # torch.where(mask[e])
    index_add: fx.Node
    index: fx.Node  # the where output used as the index_add index
    source: fx.Node  # the rows added into the accumulator


@dataclasses.dataclass
class LoopCandidate:
    accumulator: fx.Node
    inplace: bool
    steps: list[ExpertStep]
    ids: fx.Node | None = None  # (A, B) expert ids, the input of one_hot
    num_experts: int = 0  # one_hot's num_classes
    mask_dims: tuple[int, ...] = ()  # the permute applied to one_hot(ids)
    mask: fx.Node | None = None
    problem: str = ""  # set when the chain is not a loop we understand
    marker: fx.Node | None = None  # every_expert_as_expert_0: expert 0's body stands for all (traced_once.py)


def _index_add_parts(node: fx.Node):
    """(acc, dim, index, source) of an index_add call, or None."""
    if op_name(node) not in INDEX_ADD or node.op not in ("call_method", "call_function"):
        return None
    args = list(node.args)
    kw = dict(node.kwargs)
    names = ["self", "dim", "index", "source"]
    vals = {}
    for i, name in enumerate(names):
        if i < len(args):
            vals[name] = args[i]
        elif name in kw:
            vals[name] = kw.pop(name)
        else:
            return None
    alpha = kw.pop("alpha", 1)
    if kw:  # out=...
        return None
    return vals["self"], vals["dim"], vals["index"], vals["source"], alpha


def _chains(graph: fx.Graph):
    """Group index_add nodes into accumulator chains, in graph order."""
    chains: dict[fx.Node, list[fx.Node]] = {}
    root_of: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        parts = _index_add_parts(node)
        if parts is None or not isinstance(parts[0], fx.Node):
            continue
        acc = parts[0]
        root = root_of.get(acc, acc)  # out-of-place chains thread the result through
        if op_name(node) == "index_add":
            root_of[node] = root
        chains.setdefault(root, []).append(node)
    return chains


def _expert_of(where: fx.Node):
    """For where = torch.where(mask[e]): (mask, e) or None."""
    if op_name(where) != "where" or where.op != "call_function" or len(where.args) != 1 or where.kwargs:
        return None
    sel = where.args[0]
    if not (isinstance(sel, fx.Node) and is_getitem(sel) and isinstance(sel.args[1], int)):
        return None
    return sel.args[0], sel.args[1]


def _routing(mask: fx.Node):
    """mask = one_hot(ids, num_classes=E).permute(dims) -> (ids, E, dims), or a reason string."""
    if op_name(mask) != "permute":
        return f"the expert mask is made by {op_name(mask) or mask.op}, not one_hot(...).permute(...)"
    dims = mask.args[1:] if mask.op == "call_method" else mask.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    dims = tuple(dims)
    hot = mask.args[0]
    if not (isinstance(hot, fx.Node) and op_name(hot) == "one_hot"):
        return "the expert mask is not one_hot(expert ids)"
    ids = hot.args[0]
    num_classes = hot.args[1] if len(hot.args) > 1 else hot.kwargs.get("num_classes", -1)
    if not isinstance(num_classes, int) or num_classes <= 0:
        return "one_hot has no static num_classes"
    ev = example_value(ids)
    if not isinstance(ev, torch.Tensor) or ev.dim() != 2:
        return "the expert ids are not a (tokens, top_k) tensor"
    if sorted(dims) != [0, 1, 2] or dims[0] != 2:
        return f"the expert mask permutes one_hot by {dims}; the expert dimension must come first"
    return ids, num_classes, dims


def find_loop_candidates(graph: fx.Graph) -> list[LoopCandidate]:
    """Every accumulator chain whose links are indexed by torch.where(mask[e])."""
    found = []
    for root, nodes in _chains(graph).items():
        inplace = all(op_name(n) == "index_add_" for n in nodes)
        cand = LoopCandidate(accumulator=root, inplace=inplace, steps=[])
        masks = set()
        scaled = ""  # set after routing, so that the report still gives top-k
        for n in nodes:
            _, dim, index, source, alpha = _index_add_parts(n)
            if alpha != 1:
                scaled = scaled or f"index_add_ scales its rows by alpha={alpha}"
            where = index.args[0] if isinstance(index, fx.Node) and is_getitem(index) else None
            expert = _expert_of(where) if isinstance(where, fx.Node) else None
            if expert is None:
                cand.problem = cand.problem or "the index_add_ index is not torch.where(mask[e])"
                continue
            if dim != 0:
                cand.problem = cand.problem or f"index_add_ along dim {dim}, not 0"
            masks.add(expert[0])
            cand.steps.append(ExpertStep(expert[1], where, n, index, source))
        if not cand.steps:
            continue  # an index_add_ that has nothing to do with experts
        cand.marker = marker_of(nodes[-1], root)
        if len(masks) > 1:
            cand.problem = cand.problem or "the links select from different expert masks"
        if not cand.problem:
            (cand.mask,) = masks
            routing = _routing(cand.mask)
            if isinstance(routing, str):
                cand.problem = routing
            else:
                cand.ids, cand.num_experts, cand.mask_dims = routing
                experts = sorted(s.expert for s in cand.steps)
                if cand.marker is not None:
                    if experts != [0] or cand.marker.args[1] != cand.num_experts:
                        cand.problem = (f"a loop traced once runs experts {experts[:8]} and is marked for "
                                        f"{cand.marker.args[1]} experts, but routing has {cand.num_experts}")
                elif experts != list(range(cand.num_experts)):
                    cand.problem = (f"the loop runs experts {experts[:8]}{'...' if len(experts) > 8 else ''}"
                                    f" but routing has {cand.num_experts}; every expert must run once")
        cand.problem = cand.problem or scaled
        found.append(cand)
    return found


__all__ = ["find_loop_candidates", "LoopCandidate", "ExpertStep"]

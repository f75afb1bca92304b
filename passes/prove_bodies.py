"""Prove that the E unrolled bodies of a loop are one computation, run row by row.

For each expert e the body is every node that depends on torch.where(mask[e]) and feeds the rows
added to the accumulator. A body may read three kinds of values from outside:
- outer values, the same node for every expert (hidden states, routing weights);
- per-expert leaves: graph inputs (parameters) read by this expert's body alone;
- the where outputs (token and slot coordinates of the rows).
The bodies are isomorphic when a walk from each sink meets the same ops with the same constants,
the same outer values, and per-expert leaves of the same shape in the same places.

The template body (expert 0) must then act on each row independently, so that it can run once
over all rows sorted by expert: element-wise ops, row gathers by the where outputs, layout
changes that keep the row dimension outermost, and linears. A linear whose weight is a per-expert
leaf becomes a grouped GEMM. Anything else leaves the loop as traced, with the reason.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .find_loops import LoopCandidate
from .traced_once import slices_of_every_expert
from .ops import (ALONG_DIM, ASSERTS, CASTS, ELEMENTWISE, FRESH, LAYOUT, LINEAR, MATMUL, NORMS, SIZE, cast_signature,
                  example_value, is_getitem, is_inplace, op_name, slice_source, source_name, source_text)


class Unprovable(Exception):
    """The loop cannot be shown equivalent to a grouped computation; the message says why."""


@dataclasses.dataclass
class GroupedLinear:
    node: fx.Node  # the template linear, or matmul
    weights: list[fx.Node]  # per-expert weight leaves, indexed by expert
    biases: list[fx.Node] | None
    transposed: bool = True  # weights are (out, in), F.linear's; False: (in, out), used as x @ w


@dataclasses.dataclass
class PerExpertOperand:
    """A per-expert tensor in an element-wise op of the body (a bias added after `x @ w[e]`, a per-expert scale):
    each row takes its own expert's value, `stack[expert_of_row]`."""
    node: fx.Node  # the template's leaf or slice
    values: list[fx.Node]  # per-expert leaves or slices, indexed by expert


@dataclasses.dataclass
class ProvenLoop:
    candidate: LoopCandidate
    template: list[fx.Node]  # expert 0's body, in graph order
    coords: dict[fx.Node, int]  # template where-output getitem -> which where output
    linears: list[GroupedLinear]
    per_expert: list[PerExpertOperand]
    token_output: int  # which where output indexes the accumulator rows
    erase: list[fx.Node]  # every node of the loop, to remove after the rewrite
    first_step: fx.Node
    last_step: fx.Node


def _users_closure(start: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                if u not in stop:
                    todo.append(u)
    return seen


def _ancestors(start: fx.Node) -> set[fx.Node]:
    seen, todo = {start}, [start]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


@dataclasses.dataclass
class _Body:
    expert: int
    nodes: set[fx.Node]
    coords: dict[fx.Node, int]  # getitem(where, j) -> j
    leaves: set[fx.Node]
    slices: set[fx.Node]  # stack[e]: this expert's slice of a stacked weight (graph_moe's layout, 3-D experts)
    dead: set[fx.Node]  # size/assert nodes about the row count, removed with the loop


def _collect_body(step, steps_set) -> _Body:
    where = step.where
    coords = {}
    for u in where.users:
        if not (is_getitem(u) and isinstance(u.args[1], int)):
            raise Unprovable(f"torch.where of expert {step.expert} is used as a whole ({op_name(u)})")
        coords[u] = u.args[1]
    downstream = _users_closure(where, stop=steps_set)
    feeding = _ancestors(step.source)
    nodes = (downstream & feeding) - set(coords)
    dead = downstream - feeding - steps_set - set(coords)
    for d in dead:
        if op_name(d) not in SIZE | ASSERTS:
            raise Unprovable(f"{d.name} ({op_name(d)}) uses expert {step.expert}'s rows outside the loop")
    leaves, slices = set(), set()
    for n in nodes:
        for a in n.all_input_nodes:
            if a in nodes or not all(u in nodes for u in a.users):
                continue
            if a.op in ("placeholder", "get_attr"):
                leaves.add(a)
            else:  # stack[e] or stack[e].float() (not sizes[1] at e == 1)
                source = slice_source(a)
                if source is not None and source[1] == step.expert and (
                        source[2] is None or all(u is a for u in a.args[0].users)):
                    slices.add(a)
    return _Body(step.expert, nodes, coords, leaves, slices, dead)


def _kind(node, body: _Body):
    if not isinstance(node, fx.Node):
        return "const"
    if node in body.coords:
        return "coord"
    if node in body.nodes:
        return "body"
    if node in body.leaves:
        return "leaf"
    if node in body.slices:
        return "slice"
    return "outer"


def _sym_equal(a, b) -> bool:
    """Provably equal sizes (ints, SymInts, or sequences of them), without adding guards."""
    if isinstance(a, (int, torch.SymInt)) and isinstance(b, (int, torch.SymInt)):
        return statically_known_true(a == b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_sym_equal(x, y) for x, y in zip(a, b))
    return False


_IMPURE_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty")


def _same_computation(a, b, depth: int = 6) -> bool:
    """Two outside values each iteration recomputes the same way: the same pure op on the same values (MuseSpark's
    `(1.0 + norm.weight).float()` in every expert). Provably equal, so the template's own copy stands for both.
    Not through random, uninitialised or in-place ops, nor over values something writes in place."""
    if a is b:
        return not any(is_inplace(u) for u in a.users) if isinstance(a, fx.Node) else True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(
                _same_computation(x, y, depth) for x, y in zip(a, b))
        return type(a) is type(b) and a == b and not isinstance(a, (dict, slice))
    if (depth == 0 or a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target
            or is_inplace(a) or any(w in op_name(a).lower() for w in _IMPURE_WORDS)
            or a.kwargs.keys() != b.kwargs.keys()):
        return False
    return _same_computation(tuple(a.args), tuple(b.args), depth - 1) and all(
        _same_computation(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs)


def _same_leaf(a: fx.Node, b: fx.Node) -> bool:
    va, vb = example_value(a), example_value(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    # Layout and requires_grad may differ: torch.stack takes any strides and sends each gradient home.
    return _sym_equal(va.shape, vb.shape) and va.dtype == vb.dtype and va.device == vb.device


def _leaf_difference(a: fx.Node, b: fx.Node) -> str:
    """What differs between two per-expert parameters that `_same_leaf` rejects, for the report."""
    va, vb = example_value(a), example_value(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return "expert parameters that are not both tensors"
    if va.device != vb.device:
        return f"expert parameters on different devices ({va.device} against {vb.device})"
    if va.dtype != vb.dtype:
        return f"expert parameters of different dtype ({va.dtype} against {vb.dtype})"
    return f"expert parameters of different shape ({tuple(va.shape)} against {tuple(vb.shape)})"


class _Matcher:
    """Walks expert 0's body and expert e's body from their sinks in lock step."""

    def __init__(self, b0: _Body, be: _Body):
        self.b0, self.be = b0, be
        self.map: dict[fx.Node, fx.Node] = {}

    def fail(self, a, b, what):
        raise Unprovable(f"expert {self.be.expert} differs from expert 0 at {getattr(a, 'name', a)} "
                         f"vs {getattr(b, 'name', b)}: {what}")

    def arg(self, a, b):
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                self.fail(a, b, "a value against a constant")
            return self.node(a, b)
        if isinstance(a, (tuple, list)):
            if type(a) is not type(b) or len(a) != len(b):
                self.fail(a, b, "different argument structure")
            for x, y in zip(a, b):
                self.arg(x, y)
            return
        if isinstance(a, dict):
            if not isinstance(b, dict) or a.keys() != b.keys():
                self.fail(a, b, "different keyword arguments")
            for k in a:
                self.arg(a[k], b[k])
            return
        if isinstance(a, slice):
            if not isinstance(b, slice):
                self.fail(a, b, "different indexing")
            for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)):
                self.arg(x, y)
            return
        if type(a) is not type(b) or a != b:
            self.fail(a, b, f"constants {a!r} and {b!r}")

    def node(self, a: fx.Node, b: fx.Node):
        if a in self.map:
            if self.map[a] is not b:
                self.fail(a, b, "values shared differently")
            return
        ka, kb = _kind(a, self.b0), _kind(b, self.be)
        if ka != kb:
            self.fail(a, b, f"{ka} value against {kb} value")
        # With dynamic shapes Dynamo re-reads x.shape in every iteration: equal sizes are the same value.
        if (ka == "outer" and a is not b and not _sym_equal(example_value(a), example_value(b))
                and not _same_computation(a, b)):
            self.fail(a, b, "they read different outside values")
        if ka == "coord" and self.b0.coords[a] != self.be.coords[b]:
            self.fail(a, b, "different torch.where outputs")
        if ka == "leaf" and not _same_leaf(a, b):
            self.fail(a, b, _leaf_difference(a, b))
        if ka == "slice":
            (stack_a, _, cast_a), (stack_b, _, cast_b) = slice_source(a), slice_source(b)
            if stack_a is not stack_b or cast_signature(cast_a) != cast_signature(cast_b):
                self.fail(a, b, "slices of different stacked weights")
        if ka == "body":
            if a.op != b.op or a.target != b.target:
                self.fail(a, b, f"{op_name(a)} against {op_name(b)}")
            self.map[a] = b
            self.arg(tuple(a.args), tuple(b.args))
            self.arg(dict(a.kwargs), dict(b.kwargs))
            return
        self.map[a] = b


# ----------------------------------------------------------------------------------------------
# Row-by-row check of the template body


def _row_dims(val, row) -> list[int]:
    if not isinstance(val, torch.Tensor):
        return []
    out = []
    for i, s in enumerate(val.shape):
        if isinstance(s, torch.SymInt) and s.node.expr == row:
            out.append(i)
    return out


def _outermost(val, dim) -> bool:
    """Every dim before `dim` has size 1, so rows stay contiguous blocks."""
    return all(statically_known_true(s == 1) for s in val.shape[:dim])


class _RowCheck:
    def __init__(self, body: _Body, row_symbol):
        self.body = body
        self.row = row_symbol

    def fail(self, node, why):
        raise Unprovable(f"{node.name} ({op_name(node)}): {why}")

    def row_dim(self, node):
        dims = _row_dims(example_value(node), self.row)
        if len(dims) != 1:
            self.fail(node, "its result does not have exactly one row dimension")
        return dims[0]

    def check(self, node) -> str:
        """Return the role of a template node: 'gather', 'grouped' (a per-expert linear), 'rows', 'size'."""
        name = op_name(node)
        val = example_value(node)
        kinds = [(a, _kind(a, self.body)) for a in node.all_input_nodes]
        if not isinstance(val, (torch.Tensor, tuple, list)):
            if name in SIZE or name in {"mul", "add", "sub", "floordiv"}:
                for u in node.users:
                    if u in self.body.nodes and op_name(u) not in LAYOUT | SIZE:
                        self.fail(node, "uses the number of rows as a value")
                return "size"
            self.fail(node, "computes a non-tensor value in the expert body")
        if any(k == "coord" for _, k in kinds):
            return self.gather(node, name)
        if name in LINEAR or name in MATMUL:
            return self.linear(node)
        if is_getitem(node):
            return self.getitem(node)
        if any(k in ("leaf", "slice") for _, k in kinds) and name not in ELEMENTWISE:
            self.fail(node, "reads an expert parameter outside a linear layer")
        if name in ELEMENTWISE:
            return self.elementwise(node, kinds)
        if name in LAYOUT:
            src = node.args[0]
            if _kind(src, self.body) != "body":
                self.fail(node, "reshapes a value from outside the body")
            for v in (example_value(src), val):
                if not _outermost(v, self.row_dim(src) if v is example_value(src) else self.row_dim(node)):
                    self.fail(node, "moves the row dimension")
            return "rows"
        if name in ALONG_DIM or name in NORMS:
            return self.along_dim(node, name)
        self.fail(node, "is not known to act row by row")

    def gather(self, node, name):
        """Rows picked from an outer tensor by the where outputs: x[None, top_x], w[top_x, idx, None]."""
        if is_getitem(node):
            src, index = node.args
            if _kind(src, self.body) != "outer":
                self.fail(node, "indexes a body value by token coordinates")
            entries = index if isinstance(index, tuple) else (index,)
            for ent in entries:
                if isinstance(ent, fx.Node) and _kind(ent, self.body) != "coord":
                    self.fail(node, "indexes with a tensor that is not a torch.where output")
            self.row_dim(node)
            return "gather"
        if name == "index_select":
            src, _, idx = node.args
            if _kind(src, self.body) != "outer" or _kind(idx, self.body) != "coord":
                self.fail(node, "index_select that is not a row gather")
            return "gather"
        self.fail(node, "uses the token coordinates in an unknown way")

    def linear(self, node):
        """F.linear(x, w[, b]) with w (out, in), or x @ w with w (in, out): row-wise when x holds the rows."""
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if op_name(node) in MATMUL:
            if len(node.args) != 2 or node.kwargs:
                self.fail(node, "matmul with extra arguments")
            wv = example_value(w)
            if not isinstance(wv, torch.Tensor) or wv.dim() != 2:
                self.fail(node, "matmul by a value that is not a 2-D weight")
        if _kind(x, self.body) != "body":
            self.fail(node, "linear of a value from outside the body")
        xv = example_value(x)
        rd = self.row_dim(x)
        if rd == xv.dim() - 1 or not _outermost(xv, rd):
            self.fail(node, "linear across the row dimension")
        wk = _kind(w, self.body)
        bk = _kind(b, self.body) if b is not None else "none"
        if wk in ("leaf", "slice"):
            if bk not in ("leaf", "slice", "none", "const"):
                self.fail(node, "per-expert weight with a shared bias")
            if xv.dim() != 2:
                self.fail(node, "grouped GEMMs take 2-D rows; this linear has a 3-D input")
            return "grouped"
        if wk == "outer" and bk in ("outer", "none", "const"):
            return "rows"  # a weight shared by every expert: one ordinary linear over all rows
        self.fail(node, "linear whose weight depends on the routed tokens")

    def getitem(self, node):
        src, index = node.args
        sv = example_value(src)
        if isinstance(sv, (tuple, list)):
            return "rows"  # picks one piece of chunk/split
        rd = self.row_dim(src)
        entries = index if isinstance(index, tuple) else (index,)
        if any(isinstance(e, fx.Node) for e in entries):
            self.fail(node, "indexes rows with a tensor")
        pos = 0
        for i, e in enumerate(entries):
            if e is None:
                continue
            if e is Ellipsis:
                pos = sv.dim() - sum(1 for x in entries[i + 1:] if x is not None and x is not Ellipsis)
                continue
            if pos == rd and e != slice(None, None, None):
                self.fail(node, "slices the row dimension")
            pos += 1
        self.row_dim(node)
        return "rows"

    def along_dim(self, node, name):
        src = node.args[0][0] if name == "cat" else node.args[0]
        sv = example_value(src)
        if not isinstance(sv, torch.Tensor) or _kind(src, self.body) != "body":
            self.fail(node, "works on a value from outside the body")
        rd = self.row_dim(src)
        if name in NORMS:  # normalises over the trailing normalized_shape dims
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            ndims = len(shape) if isinstance(shape, (tuple, list)) else 1
            if rd >= sv.dim() - ndims:
                self.fail(node, "normalises across rows")
            return "rows"
        pos, default = ALONG_DIM[name]
        dim = node.kwargs.get("dim", node.args[pos] if len(node.args) > pos else default)
        dims = list(dim) if isinstance(dim, (tuple, list)) and dim else [dim]
        if not all(isinstance(d, int) for d in dims):
            self.fail(node, "works along an unknown dimension")
        if any(d % sv.dim() == rd for d in dims):
            self.fail(node, "works across rows")
        if name == "cat" and any(_kind(t, self.body) != "body" for t in node.args[0]):
            self.fail(node, "concatenates rows with outside values")
        return "rows"

    def elementwise(self, node, kinds):
        val = example_value(node)
        rd = self.row_dim(node)
        from_right = val.dim() - 1 - rd
        if is_inplace(node) and _kind(node.args[0], self.body) != "body":
            self.fail(node, "writes into a value from outside the body")
        for a, k in kinds:
            av = example_value(a)
            if not isinstance(av, torch.Tensor):
                continue
            if k == "body":
                ad = _row_dims(av, self.row)
                if len(ad) != 1 or av.dim() - 1 - ad[0] != from_right:
                    self.fail(node, "combines rows that do not line up")
            elif k in ("leaf", "slice"):
                # Emitted as stack[expert_of_row]: (rows, *shape), which lines up only when the value spans
                # exactly the dims right of the row dim.
                if av.dim() != from_right:
                    name = f"{source_name(a.args[0])}[e]" if k == "slice" else source_name(a)
                    self.fail(node, f"per-expert {name} of shape {tuple(av.shape)} does not line up with the rows")
            elif av.dim() > from_right and not statically_known_true(av.shape[av.dim() - 1 - from_right] == 1):
                self.fail(node, f"broadcasts {a.name} across rows")
        return "rows"


# ----------------------------------------------------------------------------------------------


def _check_accumulator(cand: LoopCandidate, first: fx.Node, last: fx.Node, erase: set[fx.Node]):
    acc = cand.accumulator
    if acc.op == "placeholder":
        raise Unprovable("the loop accumulates into a graph input (an in-place update the caller sees)")
    if cand.inplace and op_name(acc) not in FRESH:
        raise Unprovable(f"the accumulator comes from {op_name(acc) or acc.op}, which may alias other tensors")
    order = {n: i for i, n in enumerate(first.graph.nodes)}
    lo, hi = order[first], order[last]
    for u in acc.users:
        if u in erase:
            continue
        if lo < order[u] < hi:
            raise Unprovable(f"{u.name} reads the accumulator in the middle of the loop")
        if order[u] < lo and op_name(u) in LAYOUT | {"getitem", "narrow", "expand", "as_strided", "select"}:
            raise Unprovable(f"{u.name} is a view of the accumulator taken before the loop")
    # Nothing in the loop may write to a value the bodies read.
    for n in list(first.graph.nodes)[lo:hi + 1]:
        if n not in erase and is_inplace(n):
            raise Unprovable(f"{n.name} ({op_name(n)}) writes to a tensor in the middle of the loop")


def _no_shared_parameters(bodies: list[_Body]) -> None:
    """A graph input read by some experts' bodies but not all: a weight shared by a few experts, or one expert
    reading another's parameters. Name it, rather than report the first place the bodies differ."""
    readers: dict[fx.Node, set[int]] = {}
    for b in bodies:
        for n in b.nodes:
            for a in n.all_input_nodes:
                if a.op in ("placeholder", "get_attr") and isinstance(example_value(a), torch.nn.Parameter):
                    readers.setdefault(a, set()).add(b.expert)
    for param, experts in readers.items():
        if 1 < len(experts) < len(bodies):
            listed = ", ".join(map(str, sorted(experts)))
            raise Unprovable(f"{source_name(param)} is read by experts {listed} (a weight shared or read across "
                             "experts); every expert must use its own weights, or all the same one")


def _indexes_a_tensor(node: fx.Node) -> bool:
    """x[...], x.select(...), x.narrow(...) (through casts): reads of a part of a tensor, as per-expert reads are."""
    while op_name(node) in CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return (is_getitem(node) and isinstance(example_value(node.args[0]), torch.Tensor)) or op_name(node) in (
        "select", "narrow", "slice", "index_select")


def _module_tensor(node: fx.Node) -> bool:
    """A graph input that is a module's parameter or buffer (not an input of the compiled function)."""
    if node.op == "get_attr" or isinstance(example_value(node), torch.nn.Parameter):
        return True
    source = source_text(node) or ""
    return node.op == "placeholder" and ("_parameters" in source or "_buffers" in source)


def _every_expert_traced_once(b0: _Body, cand: LoopCandidate) -> list[dict]:
    """Each expert's map for a loop traced once: body 0's nodes, with each row 0 of a stack the marker lists read as
    row e. Those slices are the only per-expert values; everything else the body reads is the same for every expert
    (its code is graph_moe's, uniform by construction: layout.py `ExpertLayout.uniform`)."""
    stacks = set(cand.marker.args[2])
    b0.leaves, b0.slices = set(), set()
    for n in b0.nodes:
        for a in n.all_input_nodes:
            if a in b0.nodes or a in b0.coords:
                continue
            source = slice_source(a)
            if source is not None and source[0] in stacks:
                if source[1] != 0:
                    raise Unprovable(f"the body traced once reads row {source[1]} of {source[0].name}, not row 0")
                b0.slices.add(a)
            elif _indexes_a_tensor(a) or stacks & _ancestors(a):
                # possibly per expert, in a way the other experts' rows cannot be derived from: not read as shared
                raise Unprovable(f"the body traced once reads {a.name}, a part of a tensor that is not row 0 of a "
                                 "stack the marker lists")
            elif _module_tensor(a):  # expert 0's own weight, say: the other experts' cannot be derived from it
                raise Unprovable(f"the body traced once reads {source_name(a)}, a module's parameter or buffer, "
                                 "not row 0 of a stack the marker lists")
    rows = {}
    for s in b0.slices:
        every = slices_of_every_expert(s, cand.num_experts)
        if every is None:
            raise Unprovable(f"{slice_source(s)[0].name} does not have one row per expert ({cand.num_experts})")
        rows[s], made = every
        b0.dead |= set(made)  # erased with the loop
    return [{**{n: n for n in b0.nodes}, **{s: rows[s][e] for s in b0.slices}} for e in range(cand.num_experts)]


def prove(cand: LoopCandidate) -> ProvenLoop:
    steps = sorted(cand.steps, key=lambda s: s.expert)
    steps_set = {s.index_add for s in steps}
    bodies = [_collect_body(s, steps_set) for s in steps]
    owners: dict[fx.Node, int] = {}
    for b in bodies:
        for n in b.nodes:
            if n in owners:
                raise Unprovable(f"{n.name} belongs to the bodies of experts {owners[n]} and {b.expert}")
            owners[n] = b.expert
    token_output = bodies[0].coords.get(steps[0].index)
    for s, b in zip(steps, bodies):
        if b.coords.get(s.index) != token_output:
            raise Unprovable(f"expert {s.expert} adds its rows at a different torch.where output")
    _no_shared_parameters(bodies)
    b0 = bodies[0]
    maps = [{n: n for n in b0.nodes | b0.leaves | b0.slices}]
    if cand.marker is not None:  # expert 0's body stands for every expert's (traced_once.py)
        maps = _every_expert_traced_once(b0, cand)
    for s, b in zip(steps[1:], bodies[1:]):
        m = _Matcher(b0, b)
        m.node(steps[0].source, s.source)
        maps.append(m.map)
        matched_body = sum(1 for a in m.map if a in b0.nodes)
        if matched_body != len(b0.nodes) or len(b.nodes) != len(b0.nodes):
            raise Unprovable(f"expert {s.expert}'s body has {len(b.nodes)} ops, expert 0's has {len(b0.nodes)}")

    rows = example_value(steps[0].where)[0].shape[0]
    if not isinstance(rows, torch.SymInt):
        raise Unprovable(f"the rows per expert have a static count ({rows}, e.g. an empty batch): nothing to group")
    row = rows.node.expr
    graph_order = {n: i for i, n in enumerate(steps[0].where.graph.nodes)}
    template = sorted(b0.nodes, key=graph_order.__getitem__)
    checker = _RowCheck(b0, row)
    roles = {n: checker.check(n) for n in template}
    if roles[steps[0].source] == "size" or checker.row_dim(steps[0].source) != 0:
        raise Unprovable("the rows added to the accumulator are not laid out row-major")

    linears = []
    for n in template:
        if roles[n] != "grouped":
            continue
        w0 = n.args[1]
        bias0 = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        weights = [m[w0] for m in maps]
        biases = [m[bias0] for m in maps] if isinstance(bias0, fx.Node) else None
        linears.append(GroupedLinear(n, weights, biases, op_name(n) in LINEAR))
    if not linears:
        raise Unprovable("the expert body has no per-expert linear layer to group")

    per_expert = {}
    for n in template:
        if roles[n] == "rows" and op_name(n) in ELEMENTWISE:
            for a in n.all_input_nodes:
                if _kind(a, b0) in ("leaf", "slice") and a not in per_expert:
                    per_expert[a] = PerExpertOperand(a, [m[a] for m in maps])

    erase = set()
    for s, b in zip(steps, bodies):
        erase |= b.nodes | b.dead | b.slices | set(b.coords) | {s.where, s.index_add}
        sel = s.where.args[0]
        if all(u is s.where for u in sel.users):
            erase.add(sel)
    first = min((s.index_add for s in steps), key=graph_order.__getitem__)
    last = max((s.index_add for s in steps), key=graph_order.__getitem__)
    first_body = min(erase, key=graph_order.__getitem__)
    for n in template:
        for a in n.all_input_nodes:
            if a in erase and a not in b0.nodes and a not in b0.coords and a not in b0.slices:
                raise Unprovable(f"expert 0 reads {a.name}, a value of another expert's iteration")
    _check_accumulator(cand, first_body, last, erase)
    return ProvenLoop(cand, template, dict(b0.coords), linears, list(per_expert.values()), token_output,
                      sorted(erase, key=graph_order.__getitem__), first, last)


__all__ = ["prove", "ProvenLoop", "GroupedLinear", "PerExpertOperand", "Unprovable"]

"""A range-loop forward derived from a transformers 5.x experts class's own eager loop (its syntax tree).

Every 5.x experts class loops over the experts hit in the same way, and computes what it computes per expert
(Qwen3-MoE: `act_fn(gate) * up`, written inline in one release and as `self._apply_gate` in another; gpt-oss:
transposed weights, biases, a clamped activation; Inkling2: an fp32 accumulator; MuseSpark: a norm per expert
output; NemotronH: no gate). `derive_range_forward` rewrites the class's eager forward (`forward.__wrapped__`)
itself, whichever transformers release is installed:

    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()    dropped
    for e in hit:                                               for e in range(_graph_moe_loop.num_experts):
        e = e[0]                  (or e = e.item())             dropped
        if e == self.num_experts: continue                      dropped
        pos, tok = torch.where(mask[e])
        if tok.numel() == 0: continue  (or tok.shape[0] == 0)   dropped
        ...plain assignments...                                 F.linear(x, self.p[e]) becomes
                                                                _graph_moe_loop.linear(x, self.p, "p", e)
        acc.index_add_(0, tok, ...)
                                                                acc = _graph_moe_loop.result(acc)

and compiles the result against the original function's globals (Dynamo traces bytecode: no source file is
needed; the new source is registered in linecache under a descriptive name, for tracebacks and Dynamo's logs). The
checks and the rewrite it shares with the derivation for 4.x blocks (transformers4_generic.py) are in loop_syntax.py.
`register(cls)` (run by the family's check, so by install) derives it once per class; the forward install puts
on the instance, `generic_experts_forward`, runs the one derived for the instance's class with an `ExpertLoop`:
every expert (E), or expert 0 alone under graph_moe.compile when every per-expert read is row e of a tensor with E
rows (its body then stands for all, marked with graph_moe::every_expert_as_expert_0: passes/traced_once.py); each
`F.linear(x, self.p[e])` plus the LoRA adapters PEFT's ParamWrappers hold for `p`, as factors; nothing else.
What the pass then does with the loop is its own proof.

Why it is exact: `mask` is a one_hot (0/1) with the expert dimension first, so an expert outside `hit` has an
all-zero `mask[e]`, `torch.where` gives it empty rows, and its only effect, `acc.index_add_(0, tok, ...)`, adds
nothing. The experts hit are visited in the same ascending order (`nonzero`'s), so eager results are
bit-identical. That holds only if the body has no other effect and its iterations are independent, so the
derivation refuses, with the reason, anything it cannot see is so: the loop must iterate the name bound to that
`nonzero()`, computed after the mask is complete and read nowhere else; the mask must be `one_hot(<indices>,
num_classes=self.num_experts[ + 1]).permute(2, 1, 0)` (names resolved in the module: `torch.where`, `one_hot`,
`torch.greater` must be torch's) and be read nowhere else; the body may hold only the guards above, plain
assignments to names (no in-place call, no `out=`) and one final `<acc>.index_add_(0, <a torch.where output>,
...)`; a name the body assigns may not be read before the same iteration assigns it, nor outside the loop; the
expert index may only index (`x[e]`: a Python int and the original's 0-d tensor select the same). Calls in the
body (`self.act_fn(...)`, a norm module) are taken to be functions of their arguments: on an expert without
tokens they now also run, on empty rows (a forward hook on such a module would see those calls).

One more change, for the pass (which needs as many mask rows as experts visited): `num_classes=self.num_experts
+ 1` becomes `self.num_experts`. The extra class holds expert parallelism's sentinel id, which the loop skips;
the family's check refuses expert parallelism, so every id is below E and rows 0..E-1 of the mask are unchanged.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import types
from typing import Callable

import torch

import torch.nn.functional as F
from torch.nn.utils import parametrize

from graph_moe.families.common import trace_once_requested
from graph_moe.families.loop_syntax import (LOOP, Refused, assigned, check_independent, define, expert_hit_mask,
                                            final_index_add, into_range_loop, is_guard, loop_and_preamble, names,
                                            not_reassigned, parents, parse, plain_assignment, resolves_to, same,
                                            text)

_RANGE_FORWARDS: dict[type, Callable] = {}  # experts class -> its derived forward; filled by `register`
LORA_KWARG = "_graph_moe_lora"  # the bound PEFT ParamWrappers, passed down from the outermost one (transformers5.py)


def generic_experts_forward(self, *args, **kwargs):
    """The forward install puts on the instance (one function for every class, so install and uninstall know it
    as graph_moe's): the range-loop forward derived for this instance's class."""
    derived = _derived_for(self)
    wrappers = kwargs.pop(LORA_KWARG, ())
    loop = ExpertLoop(self, derived.graph_moe_reads, {name: _lora_factors(wrappers, name)
                                                       for name in derived.graph_moe_reads.linear})
    return derived(self, *args, **kwargs, **{LOOP: loop})


def _derived_for(experts):
    # The nearest registered class: torch's parametrize (PEFT's ParamWrapper uses it) swaps the instance's class
    # for a subclass made on the fly, which inherits the forward.
    for cls in type(experts).__mro__:
        if cls in _RANGE_FORWARDS:
            return _RANGE_FORWARDS[cls]
    raise RuntimeError(f"graph_moe: no range loop registered for {type(experts).__name__}; call graph_moe.install")


def register(cls: type) -> str | None:
    """Derive `cls`'s range-loop forward (cached) and make it the one `generic_experts_forward` runs; the reason
    it cannot be derived, or None."""
    original = getattr(cls.forward, "__wrapped__", None)  # under @use_experts_implementation
    if original is None:
        return f"{cls.__name__}.forward is not under @use_experts_implementation"
    derived = derive_range_forward(original)
    if isinstance(derived, str):
        return f"{cls.__name__}'s eager loop cannot become a range loop: {derived}"
    _RANGE_FORWARDS[cls] = derived
    return None


def linear_reads(cls: type) -> tuple[str, ...]:
    """The parameters the derived loop of `cls` reads only as `F.linear(x, self.<name>[e])` (LoRA can be added), in
    the order the loop reads them."""
    derived = _RANGE_FORWARDS.get(cls)
    return derived.graph_moe_reads.linear if derived is not None else ()


@dataclasses.dataclass(frozen=True)
class ExpertReads:
    """What the loop body reads per expert, besides the mask row: `self.<name>[e]` for each name in `stacks`, of
    which those in `linear` only as `F.linear(x, self.<name>[e])`; `other`: it also indexes something else by e."""
    stacks: frozenset[str]
    linear: tuple[str, ...]  # in the order the loop first reads them
    other: bool


class ExpertLoop:
    """What the derived loop asks of graph_moe: how many experts to visit, each `F.linear(x, self.<name>[e])` with
    its LoRA adapters added as factors, and the loop's result (marked when expert 0's body stands for all)."""

    def __init__(self, experts, reads: ExpertReads, lora: dict):
        self.lora = lora
        self.total = experts.num_experts
        # A stack held in 4-bit (graph_moe/experts_4bit.py) is dequantized once per forward, for every expert's read
        self.weights = {}
        for name in reads.linear:
            value = getattr(experts, name, None)
            if value is not None and not isinstance(value, torch.Tensor):
                self.weights[name] = value.dequantize(experts)
        stacks = [self.weights.get(name, getattr(experts, name, None)) for name in sorted(reads.stacks)]
        stacks += [t for factors in lora.values() for a, b, _ in factors for t in (a, b)]
        # Expert 0's body stands for every expert's only when each per-expert read is row e of a tensor with one row
        # per expert (a parametrized weight is rebuilt in the graph: traced whole).
        self.once = (trace_once_requested() and not reads.other and not parametrize.is_parametrized(experts)
                     and all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == self.total
                             for t in stacks))
        self.stacks = stacks
        self.num_experts = 1 if self.once else self.total

    def linear(self, x, stack, name, e):
        out = F.linear(x, self.weights.get(name, stack)[e])
        for a_stack, b_stack, scaling in self.lora.get(name, ()):
            out = out + F.linear(F.linear(x, a_stack[e]), b_stack[e]) * scaling
        return out

    def result(self, accumulator):
        if self.once:  # expert 0's body stands for every expert's; the pass groups it over all of them
            return torch.ops.graph_moe.every_expert_as_expert_0(accumulator, self.total, self.stacks)
        return accumulator


def _lora_factors(wrappers, parameter_name):
    """(A (E, r, in), B (E, out, r), scaling) of each adapter PEFT would add to `parameter_name` now.

    PEFT's ParamWrapper.forward adds the active adapters unless disabled or merged (then the base already holds
    them); the factors are PEFT's own, in the parameter's dtype, as its forward folds them."""
    factors = []
    for wrapper in wrappers:
        if wrapper.parameter_name != parameter_name or wrapper.disable_adapters or wrapper.merged:
            continue
        for adapter in wrapper.active_adapters:
            if adapter in wrapper.lora_A:
                b_stack, a_stack, scaling = wrapper.get_delta_factors(adapter)
                # B is a permuted view of lora_B.weight (experts innermost), which torch._grouped_mm rejects: copy it
                # expert-major (r columns wide: small). Into a new tensor, because Inductor drops `.contiguous()`
                # before _grouped_mm, whose fallback only asks for some unit stride (torch 2.13).
                factors.append((a_stack, b_stack.new_empty(b_stack.shape).copy_(b_stack), scaling))
    return factors


@functools.lru_cache(maxsize=None)
def derive_range_forward(original: types.FunctionType) -> types.FunctionType | str:
    """The range-loop twin of `original` (an experts class's eager forward), or why not."""
    try:
        function = parse(original)
        reads = _transform(function, original)
    except Refused as e:
        return str(e)
    derived = define(function, original, "as a range loop")
    derived.__doc__ = (f"{derived.__qualname__}, looping over range(self.num_experts) "
                       "(graph_moe.families.transformers5_generic)")
    derived.graph_moe_reads = reads
    return derived


def _transform(function, original) -> ExpertReads:
    """Check `function` (the parsed eager forward) and rewrite it in place into the range loop."""
    self_name, indices = _signature(function)
    loop, preamble, containers = loop_and_preamble(function)
    hit_assign, _, mask, coordinates, squeezed = expert_hit_mask(
        function, preamble, loop, original, self_name=self_name, indices=indices, sentinel=True, squeeze=False)
    expert = loop.target.id
    kept = _body(loop.body, expert, squeezed, self_name, coordinates, mask)
    check_independent(function, loop, kept, expert)
    _expert_only_indexes(kept, expert)
    reads = _ExpertReads(expert, self_name, mask, original)
    kept = [reads.visit(statement) for statement in kept]
    # The rewrite: loop over the experts graph_moe asks for (every one, or expert 0 standing for all), without the
    # guards and the hit computation; each F.linear(x, self.<p>[e]) through the ExpertLoop (which adds LoRA
    # factors), and the accumulator handed to it after the loop.
    into_range_loop(function, loop, kept, hit_assign, containers, original)
    return reads.result()


class _ExpertReads(ast.NodeTransformer):
    """Records what the body indexes by the expert (see ExpertReads) and routes `F.linear(x, self.<p>[e])` through
    the ExpertLoop."""

    def __init__(self, expert: str, self_name: str, mask: str, original):
        self.expert, self.self_name, self.mask, self.original = expert, self_name, mask, original
        self.linear, self.plain, self.other = {}, set(), False  # linear: a dict for the order of first reads

    def result(self) -> ExpertReads:
        return ExpertReads(frozenset(self.linear) | frozenset(self.plain),
                           tuple(name for name in self.linear if name not in self.plain), self.other)

    def _row_of_self(self, node) -> str | None:
        """`p` for `self.<p>[e]`."""
        if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Name) and node.slice.id == self.expert
                and isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name)
                and node.value.value.id == self.self_name):
            return node.value.attr
        return None

    def visit_Call(self, node):
        name = self._row_of_self(node.args[1]) if len(node.args) == 2 and not node.keywords else None
        if name is None or not resolves_to(node.func, self.original, torch.nn.functional.linear):
            return self.generic_visit(node)
        self.linear[name] = None
        return ast.Call(func=ast.Attribute(ast.Name(LOOP, ast.Load()), "linear", ast.Load()),
                        args=[self.visit(node.args[0]), node.args[1].value, ast.Constant(name),
                              ast.Name(self.expert, ast.Load())], keywords=[])

    def visit_Subscript(self, node):
        if isinstance(node.slice, ast.Name) and node.slice.id == self.expert:
            name = self._row_of_self(node)
            if name is not None:
                self.plain.add(name)
            elif not (isinstance(node.value, ast.Name) and node.value.id == self.mask):
                self.other = True
        return self.generic_visit(node)


def _signature(function) -> tuple[str, str]:
    """(self, <indices>) of forward(self, hidden_states, <indices>, <weights>), neither reassigned."""
    a = function.args
    if a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or len(a.args) != 4:
        raise Refused("the signature is not (self, hidden_states, <indices>, <weights>)")
    self_name, _, indices, _ = (arg.arg for arg in a.args)
    reassigned = {n.id for n in names(function, ast.Store)} & {self_name, indices}
    if reassigned:
        raise Refused(f"the forward reassigns {', '.join(sorted(reassigned))}")
    return self_name, indices


def _body(body, expert: str, squeezed: bool, self_name: str, coordinates: set[str], mask: str) -> list:
    """The body's statements to keep: plain assignments without effects and the final index_add_; the unpacking
    of the loop index and the guards are dropped. Anything else is refused."""
    # The loop index from `hit` is a row (a 0-d tensor once squeezed): the first statement takes the id out of it.
    first = body[0]
    unpacks = [f"{expert}.item()"] + ([] if squeezed else [f"{expert}[0]"])
    if not (isinstance(first, ast.Assign) and len(first.targets) == 1 and assigned(first) == [expert]
            and any(same(first.value, u) for u in unpacks)):
        raise Refused(f"the loop does not start with `{expert} = {unpacks[-1]}`")
    accumulator = final_index_add(body[-1], coordinates)
    kept = []
    for statement in body[1:-1]:
        if is_guard(statement, expert, self_name, coordinates):
            continue
        plain_assignment(statement)
        kept.append(statement)
    not_reassigned(kept, accumulator, mask)
    return kept + [body[-1]]


def _expert_only_indexes(kept, expert: str) -> None:
    """The expert index only indexes (a Python int and the original's 0-d tensor then select the same)."""
    parent = parents(kept)
    for statement in kept:
        for name in names(statement, ast.Load):
            if name.id == expert and not (isinstance(parent.get(id(name)), ast.Subscript)
                                          and parent[id(name)].slice is name):
                raise Refused(f"`{text(statement)}` uses the expert index {expert} other than as x[{expert}]")

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
        if tok.numel() == 0: continue                           dropped
        ...plain assignments...                                 F.linear(x, self.p[e]) becomes
                                                                _graph_moe_loop.linear(x, self.p, "p", e)
        acc.index_add_(0, tok, ...)
                                                                acc = _graph_moe_loop.result(acc)

and compiles the result against the original function's globals (Dynamo traces bytecode: no source file is
needed; the new source is registered in linecache under a descriptive name, for tracebacks and Dynamo's logs).
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
import builtins
import dataclasses
import functools
import inspect
import linecache
import textwrap
import types
from typing import Callable

import torch

import torch.nn.functional as F
from torch.nn.utils import parametrize

from graph_moe.families.common import trace_once_requested

_RANGE_FORWARDS: dict[type, Callable] = {}  # experts class -> its derived forward; filled by `register`
LORA_KWARG = "_graph_moe_lora"  # the bound PEFT ParamWrappers, passed down from the outermost one (transformers5.py)
_LOOP = "_graph_moe_loop"  # the derived forward's added parameter: an ExpertLoop


def generic_experts_forward(self, *args, **kwargs):
    """The forward install puts on the instance (one function for every class, so install and uninstall know it
    as graph_moe's): the range-loop forward derived for this instance's class."""
    derived = _derived_for(self)
    wrappers = kwargs.pop(LORA_KWARG, ())
    loop = ExpertLoop(self, derived.graph_moe_reads, {name: _lora_factors(wrappers, name)
                                                       for name in derived.graph_moe_reads.linear})
    return derived(self, *args, **kwargs, **{_LOOP: loop})


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


class _Refused(Exception):
    pass


@functools.lru_cache(maxsize=None)
def derive_range_forward(original: types.FunctionType) -> types.FunctionType | str:
    """The range-loop twin of `original` (an experts class's eager forward), or why not."""
    try:
        source = textwrap.dedent(inspect.getsource(original))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as e:
        return f"its source cannot be read ({e})"
    try:
        function, reads = _transform(tree.body[0], original)
    except _Refused as e:
        return str(e)
    new_source = ast.unparse(function) + "\n"
    where = getattr(original, "__qualname__", original.__name__)
    filename = f"<graph_moe: {original.__module__}.{where}, as a range loop>"
    linecache.cache[filename] = (len(new_source), None, new_source.splitlines(True), filename)
    namespace: dict = {}
    # Against the original's globals, so `torch`, `nn`, `F`, ... mean what they meant there.
    exec(compile(new_source, filename, "exec"), original.__globals__, namespace)
    derived = namespace[function.name]
    derived.__qualname__ = where
    derived.__doc__ = f"{where}, looping over range(self.num_experts) (graph_moe.families.transformers5_generic)"
    derived.graph_moe_reads = reads
    return derived


# ----------------------------------------------------------------------------------------------- the checks


def _text(node) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 90 else text[:87] + "..."


def _same(node, template: str) -> bool:
    """`node` is the expression `template` (syntax trees compared, positions ignored)."""
    return ast.dump(node) == ast.dump(ast.parse(template, mode="eval").body)


def _resolves_to(node, original, target) -> bool:
    """A dotted name (torch.where, F.one_hot) that means `target` in the original's module."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return False
    value = original.__globals__.get(node.id, getattr(builtins, node.id, None))
    for attr in reversed(parts):
        value = getattr(value, attr, None)
    return value is target


def _names(node, ctx) -> list[ast.Name]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)]


def _assigned(statement) -> list[str]:
    return [n.id for n in _names(statement, ast.Store)]


def _mask_definition(function, preamble, mask: str, indices: str, self_name: str, original) -> list[ast.Assign]:
    """The assignments that make `mask` = one_hot(indices, num_classes=E[ + 1]).permute(2, 1, 0), with a `+ 1`
    num_classes rewritten to E (see the module docstring)."""
    stores = [s for s in preamble if isinstance(s, ast.Assign) and mask in _assigned(s)]
    if len(stores) != len([n for n in _names(function, ast.Store) if n.id == mask]):
        raise _Refused(f"{mask} is assigned outside the statements before the loop")
    if not stores or len(stores) > 2 or any(len(s.targets) != 1 or not isinstance(s.targets[0], ast.Name)
                                            for s in stores):
        raise _Refused(f"{mask} is not made by one_hot(...) and permute(2, 1, 0)")
    hot = stores[0].value
    permuted = len(stores) == 2 and _same(stores[1].value, f"{mask}.permute(2, 1, 0)")
    if len(stores) == 1 and _is_permute_210(hot):
        hot, permuted = hot.func.value, True
    if not permuted:
        raise _Refused(f"{mask} does not put the expert dimension first with permute(2, 1, 0)")
    if not (isinstance(hot, ast.Call) and _resolves_to(hot.func, original, torch.nn.functional.one_hot)):
        raise _Refused(f"{mask} is not made by torch.nn.functional.one_hot")
    if len(hot.args) + len(hot.keywords) != 2 or not (hot.args and _same(hot.args[0], indices)):
        raise _Refused(f"{mask} is not one_hot({indices}, num_classes=...)")
    holder = hot.args if len(hot.args) == 2 else hot.keywords[0]
    if holder is not hot.args and holder.arg != "num_classes":
        raise _Refused(f"{mask} is not one_hot({indices}, num_classes=...)")
    classes = hot.args[1] if holder is hot.args else holder.value
    experts = f"{self_name}.num_experts"
    if _same(classes, f"{experts} + 1"):  # the expert-parallel sentinel's class, never visited
        classes = ast.parse(experts, mode="eval").body
        if holder is hot.args:
            hot.args[1] = classes
        else:
            holder.value = classes
    elif not _same(classes, experts):
        raise _Refused(f"one_hot has num_classes={_text(classes)}, not {experts} (+ 1)")
    return stores


def _is_permute_210(node) -> bool:
    """`<x>.permute(2, 1, 0)`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and _same(node, f"({ast.unparse(node.func.value)}).permute(2, 1, 0)"))


def _is_guard(statement, expert: str, self_name: str, coordinates: set[str]) -> bool:
    """`if e == self.num_experts: continue` (never true in the range loop) or `if tok.numel() == 0: continue` (an
    expert without tokens adds nothing either way)."""
    if not (isinstance(statement, ast.If) and not statement.orelse and len(statement.body) == 1
            and isinstance(statement.body[0], ast.Continue)):
        return False
    if _same(statement.test, f"{expert} == {self_name}.num_experts"):
        return True
    return any(_same(statement.test, f"{c}.numel() == 0") for c in coordinates)


def _no_side_effect(expression, where: str) -> None:
    for node in ast.walk(expression):
        if isinstance(node, (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await, ast.Lambda)):
            raise _Refused(f"{where} holds {type(node).__name__}")
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_") \
                    and not node.func.attr.startswith("_"):
                raise _Refused(f"{where} calls the in-place {node.func.attr}")
            if any(k.arg == "out" for k in node.keywords):
                raise _Refused(f"{where} writes through out=")


def _transform(function, original) -> ast.FunctionDef:
    """Check `function` (the parsed eager forward) and rewrite it in place into the range loop."""
    self_name, indices = _signature(function, original)
    loop, preamble, containers = _loop_and_preamble(function)
    expert, hit = loop.target.id, loop.iter.id
    hit_assign = _hit_assignment(function, preamble, hit)
    where, mask, coordinates = _where(loop.body, expert, original)
    squeezed = _check_hit(hit_assign, hit, mask, original)
    mask_stores = _mask_definition(function, preamble, mask, indices, self_name, original)
    if preamble.index(hit_assign) < preamble.index(mask_stores[-1]):
        raise _Refused(f"{hit} is computed before {mask} is complete")
    mask_readers = [s.value for s in mask_stores[1:]] + [hit_assign.value, where.value]
    allowed = {id(n) for reader in mask_readers for n in _names(reader, ast.Load)}
    if any(id(n) not in allowed for n in _names(function, ast.Load) if n.id == mask):
        raise _Refused(f"{mask} is read outside the mask, hit and torch.where computations")
    kept = _body(loop.body, expert, squeezed, self_name, coordinates, mask)
    _check_independent(function, loop, kept, expert)
    if "range" in original.__globals__:
        raise _Refused("the module shadows range")

    if any(n.id == _LOOP for n in ast.walk(function) if isinstance(n, ast.Name)):
        raise _Refused(f"the forward uses the name {_LOOP}")
    reads = _ExpertReads(expert, self_name, mask, original)
    kept = [reads.visit(statement) for statement in kept]

    # The rewrite: loop over the experts graph_moe asks for (every one, or expert 0 standing for all), without the
    # guards and the hit computation; each F.linear(x, self.<p>[e]) through the ExpertLoop (which adds LoRA
    # factors), and the accumulator handed to it after the loop.
    function.args.kwonlyargs.append(ast.arg(_LOOP))
    function.args.kw_defaults.append(None)
    loop.iter = ast.parse(f"range({_LOOP}.num_experts)", mode="eval").body
    loop.body = kept
    accumulator = kept[-1].value.func.value.id
    function.body.insert(function.body.index(loop) + 1,
                         ast.parse(f"{accumulator} = {_LOOP}.result({accumulator})").body[0])
    container = containers[id(hit_assign)]
    if container is hit_assign:
        function.body.remove(hit_assign)
    else:
        container.body.remove(hit_assign)
        container.body = container.body or [ast.Pass()]
    return ast.fix_missing_locations(function), reads.result()


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
        if name is None or not _resolves_to(node.func, self.original, torch.nn.functional.linear):
            return self.generic_visit(node)
        self.linear[name] = None
        return ast.Call(func=ast.Attribute(ast.Name(_LOOP, ast.Load()), "linear", ast.Load()),
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


def _signature(function, original) -> tuple[str, str]:
    """(self, <indices>) of a plain forward(self, hidden_states, <indices>, <weights>), neither reassigned."""
    if not isinstance(function, ast.FunctionDef):
        raise _Refused("the forward is not a plain function")
    if function.decorator_list:
        raise _Refused("the forward has decorators")
    if original.__code__.co_freevars:
        raise _Refused("the forward reads closure variables")
    a = function.args
    if a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or len(a.args) != 4:
        raise _Refused("the signature is not (self, hidden_states, <indices>, <weights>)")
    self_name, _, indices, _ = (arg.arg for arg in a.args)
    reassigned = {n.id for n in _names(function, ast.Store)} & {self_name, indices}
    if reassigned:
        raise _Refused(f"the forward reassigns {', '.join(sorted(reassigned))}")
    # Annotations would be evaluated at definition here (the original's module may defer them): not needed.
    for arg in a.args:
        arg.annotation = None
    function.returns = None
    return self_name, indices


def _loop_and_preamble(function):
    """The one loop `for <name> in <name>:` at the top level; the statements before it, those of `with` blocks
    (`torch.no_grad()`) included; and for each of those the top-level statement holding it."""
    loops = [n for n in ast.walk(function) if isinstance(n, (ast.For, ast.AsyncFor, ast.While))]
    if len(loops) != 1 or loops[0] not in function.body or not isinstance(loops[0], ast.For):
        raise _Refused(f"the forward has {len(loops)} loops; one `for` at the top level is expected")
    loop = loops[0]
    if not (isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Name)) or loop.orelse:
        raise _Refused(f"the loop `for {_text(loop.target)} in {_text(loop.iter)}` is not over a name, without else")
    preamble, containers = [], {}
    for statement in function.body[:function.body.index(loop)]:
        inner = statement.body if isinstance(statement, ast.With) else [statement]
        preamble += inner
        containers.update((id(s), statement) for s in inner)
    return loop, preamble, containers


def _hit_assignment(function, preamble, hit: str) -> ast.Assign:
    """`hit = ...`, the only binding of the loop's iterable, before the loop; read by the loop header alone."""
    stores = [n for n in _names(function, ast.Store) if n.id == hit]
    assigns = [s for s in preamble if isinstance(s, ast.Assign) and hit in _assigned(s)]
    if len(stores) != 1 or len(assigns) != 1 or len(assigns[0].targets) != 1 or _assigned(assigns[0]) != [hit]:
        raise _Refused(f"the loop's iterable {hit} is not bound once, by `{hit} = ...nonzero()`, before the loop")
    if len([n for n in _names(function, ast.Load) if n.id == hit]) != 1:
        raise _Refused(f"{hit} is read outside the loop header")
    return assigns[0]


def _where(body, expert: str, original):
    """The body's `pos, tok = torch.where(<mask>[expert])`: (the statement, the mask's name, {pos, tok})."""
    wheres = [s for s in body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Call)
              and _resolves_to(s.value.func, original, torch.where)]
    if len(wheres) != 1:
        raise _Refused(f"the loop body has {len(wheres)} torch.where(...) assignments; one is expected")
    where = wheres[0]
    call = where.value
    target = where.targets[0] if len(where.targets) == 1 else None
    if not (len(call.args) == 1 and not call.keywords and isinstance(call.args[0], ast.Subscript)
            and isinstance(call.args[0].value, ast.Name) and _same(call.args[0].slice, expert)
            and isinstance(target, ast.Tuple) and len(target.elts) == 2
            and all(isinstance(t, ast.Name) for t in target.elts)):
        raise _Refused(f"`{_text(where)}` is not `pos, tok = torch.where(<mask>[{expert}])`")
    return where, call.args[0].value.id, {t.id for t in target.elts}


def _check_hit(hit_assign, hit: str, mask: str, original) -> bool:
    """`hit` is the experts with tokens in `mask`, in ascending order (nonzero's), as rows or, squeezed, as 0-d
    tensors (returned: squeezed)."""
    value = hit_assign.value
    plain = f"torch.greater({mask}.sum(dim=(-1, -2)), 0).nonzero()"
    squeezed = _same(value, plain + ".squeeze(-1)")
    nonzero = value.func.value if squeezed else value
    if not (_same(nonzero, plain) and _resolves_to(nonzero.func.value.func, original, torch.greater)):
        raise _Refused(f"`{hit} = {_text(value)}` is not the experts with tokens in {mask}, {plain}")
    return squeezed


def _body(body, expert: str, squeezed: bool, self_name: str, coordinates: set[str], mask: str) -> list:
    """The body's statements to keep: plain assignments without effects and the final index_add_; the unpacking
    of the loop index and the guards are dropped. Anything else is refused."""
    # The loop index from `hit` is a row (a 0-d tensor once squeezed): the first statement takes the id out of it.
    first = body[0]
    unpacks = [f"{expert}.item()"] + ([] if squeezed else [f"{expert}[0]"])
    if not (isinstance(first, ast.Assign) and len(first.targets) == 1 and _assigned(first) == [expert]
            and any(_same(first.value, u) for u in unpacks)):
        raise _Refused(f"the loop does not start with `{expert} = {unpacks[-1]}`")

    last = body[-1]
    add = last.value if isinstance(last, ast.Expr) else None
    if not (isinstance(add, ast.Call) and isinstance(add.func, ast.Attribute) and add.func.attr == "index_add_"
            and isinstance(add.func.value, ast.Name) and len(add.args) == 3 and not add.keywords
            and _same(add.args[0], "0") and isinstance(add.args[1], ast.Name) and add.args[1].id in coordinates):
        raise _Refused(f"the loop does not end with `<acc>.index_add_(0, <a torch.where output>, ...)` "
                       f"(it ends with `{_text(last)}`)")
    _no_side_effect(add.args[2], "the index_add_ source")

    kept = []
    for statement in body[1:-1]:
        if _is_guard(statement, expert, self_name, coordinates):
            continue
        if not isinstance(statement, ast.Assign):
            raise _Refused(f"the loop body holds `{_text(statement)}`: only plain assignments, the guards and "
                           "the final index_add_ are understood")
        for t in statement.targets:
            elements = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
            if not all(isinstance(x, ast.Name) for x in elements):
                raise _Refused(f"`{_text(statement)}` assigns to something other than a name")
        _no_side_effect(statement.value, f"`{_text(statement)}`")
        kept.append(statement)
    accumulator = add.func.value.id
    for name in (accumulator, mask):
        if any(name in _assigned(s) for s in kept):
            raise _Refused(f"the loop body reassigns {name}")
    return kept + [last]


def _check_independent(function, loop, kept, expert: str) -> None:
    """Each iteration reads only what it assigned itself or what the loop does not assign; nothing after the loop
    reads what the loop assigned; the expert index only indexes (a Python int and the original's 0-d tensor then
    select the same)."""
    assigned = {expert} | {name for s in kept for name in _assigned(s)}
    bound = {expert}
    for statement in kept:
        for name in _names(statement.value, ast.Load):
            if name.id in assigned and name.id not in bound:
                raise _Refused(f"`{_text(statement)}` reads {name.id} before this iteration assigns it")
        bound.update(_assigned(statement))
    outside = [s for s in function.body if s is not loop]
    leaked = {n.id for s in outside for n in _names(s, ast.Load)} & assigned
    if leaked:
        raise _Refused(f"{', '.join(sorted(leaked))}, assigned in the loop, is read outside it")
    parents = {id(child): node for s in kept for node in ast.walk(s) for child in ast.iter_child_nodes(node)}
    for statement in kept:
        for name in _names(statement, ast.Load):
            parent = parents.get(id(name))
            if name.id == expert and not (isinstance(parent, ast.Subscript) and parent.slice is name):
                raise _Refused(f"`{_text(statement)}` uses the expert index {expert} other than as x[{expert}]")

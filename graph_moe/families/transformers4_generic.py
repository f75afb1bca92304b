"""A traceable forward derived from a transformers 4.x MoE block's own forward (its syntax tree), for the 4.x classes
with experts in an nn.ModuleList and no hand-written family (Ernie 4.5 MoE in 4.57, and any class written the same
way: remote code, a release graph_moe was not written against).

transformers 4.x blocks loop over the experts hit, each the same way; `derive_block_forward` rewrites the class's
forward itself, leaving everything around the loop (router, autocast, jitter, shared experts, returned tuple) as
the class has it:

    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()    dropped
    for e in hit:                                               for e in range(_graph_moe_loop.num_experts):
        layer = self.experts[e]                                 dropped
        pos, tok = torch.where(mask[e].squeeze(0))              pos, tok = torch.where(mask[e])
        ...plain assignments...
        out = layer(x) * ...      (or self.experts[e](x))       out = _graph_moe_loop.expert(e, x) * ...
        acc.index_add_(0, tok, ...)
                                                                acc = _graph_moe_loop.result(acc)

compiled against the original function's globals (loop_syntax.py, which the 5.x derivation, transformers5_generic.py,
shares). `derives(cls)` (run by family lookup, so by install) derives it once per class; the forward install puts on
the instance, `block_forward`, runs the one derived for the instance's class with a `ModuleListLoop` (common.py),
the loop `range_expert_loop` runs too: every expert, or expert 0 alone under graph_moe.compile when the grouped layout
makes every body expert 0's reading row e of its stacks; expert e from the layout's stacks while it is current, else
its module.

Why it is exact: as in the 5.x derivation (its docstring), `mask` is a one_hot with the expert dimension first, so an
expert outside `hit` has an all-zero row, no tokens, and adds nothing; the experts hit come in the same ascending
order, so eager results are bit-identical. The loop index differs: the original's is a shape-(1,) row of `nonzero()`
(0-d if squeezed), the range loop's an int. `self.experts[e]` selects the same module with either; `mask[e]` the
same row, without the leading 1 that `.squeeze(0)` removed, so the squeeze goes (with an int index it would drop the
top-k dimension when top_k == 1). Any other use could tell them apart (`x[e]` of shape (1, ...) against (...)), so
the index may appear only in those two places.

Refused with the reason, in the install report: all that loop_syntax.py checks (the loop iterates the name bound
once to that `nonzero()`, after the mask is complete and read nowhere else; the mask is `one_hot(<indices>,
num_classes=self.num_experts).permute(2, 1, 0)` read only by the hit set and the body's one `torch.where`; the body
holds only plain assignments to names without in-place calls or `out=`, guards `if tok.numel() == 0` / `if
tok.shape[0] == 0: continue` after the `torch.where`, and a final `acc.index_add_(0, tok, ...)`; each iteration
reads only what it assigned itself or what the loop does not assign; nothing after the loop reads what it
assigned), and besides: the expert module is read once, as `layer = self.experts[e]` with `layer` read only as
`layer(x)`, or as `self.experts[e](x)`; the accumulator is read in the body only by its `index_add_`; the body
does not reassign the index. The expert module is taken to be a function of its input: on an expert without tokens
it now also runs, on empty rows (as in every hand-written family; a forward hook on it would see those calls).

A forward whose loop iterates `range(...)` already has nothing to derive (the pass takes such a loop as it is): its
class stays without a traceable forward, reported as before.
"""

from __future__ import annotations

import ast
import functools
import types
from collections.abc import Callable

from graph_moe.families.common import Family, ModuleListLoop
from graph_moe.families.loop_syntax import (LOOP, Refused, check_independent, define, expert_hit_mask,
                                            final_index_add, into_range_loop, is_guard, loop_and_preamble, names,
                                            not_reassigned, parents, parse, plain_assignment, resolves_to, same,
                                            text)
from graph_moe.layout import usable_layout

_DERIVED: dict[type, Callable] = {}  # block class -> its derived forward, for `block_forward`; kept by `derives`


def block_forward(self, *args, **kwargs):
    """The forward install puts on the instance (one function for every class, so install and uninstall know it
    as graph_moe's): the forward derived for this instance's class, looping through a ModuleListLoop."""
    loop = ModuleListLoop(self.experts, self.num_experts, usable_layout(self))
    return _derived_for(self)(self, *args, **kwargs, **{LOOP: loop})


FAMILY = Family(block_forward, "H", ())


def _derived_for(block):
    # The nearest derived class: torch's parametrize swaps the instance's class for a subclass made on the fly,
    # which inherits the forward.
    for cls in type(block).__mro__:
        if cls in _DERIVED:
            return _DERIVED[cls]
    raise RuntimeError(f"graph_moe: no derived forward for {type(block).__name__}; call graph_moe.install")


def derives(cls: type) -> bool:
    """Whether `cls` gets a forward derived from its own (derived once per class forward: a class forward replaced
    since is derived anew)."""
    derived = derive_block_forward(cls.forward)
    if callable(derived):
        _DERIVED[cls] = derived
    else:
        _DERIVED.pop(cls, None)
    return callable(derived)


def refusal(cls: type) -> str | None:
    """Why `cls` gets no derived forward, for the report; None when it gets one, or when its loop iterates
    `range(...)` already (nothing to derive)."""
    why = derive_block_forward(cls.forward)
    return f"{cls.__name__}'s expert loop cannot become a range loop: {why}" if isinstance(why, str) else None


class _RangeAlready(Refused):
    pass


@functools.cache
def derive_block_forward(original) -> types.FunctionType | str | None:
    """The range-loop twin of `original` (a 4.x block's forward); else why not, or None when its loop iterates
    `range(...)` already."""
    try:
        function = parse(original)
        _transform(function, original)
    except _RangeAlready:
        return None
    except Refused as e:
        return str(e)
    derived = define(function, original, "looping over every expert")
    derived.__doc__ = (f"{derived.__qualname__}, looping over range(self.num_experts) "
                       "(graph_moe.families.transformers4_generic)")
    return derived


def _transform(function, original) -> None:
    """Check `function` (the parsed forward) and rewrite it in place into the range loop."""
    self_name = _signature(function)
    loop, preamble, containers = loop_and_preamble(function)
    if isinstance(loop.iter, ast.Call) and resolves_to(loop.iter.func, original, range):
        raise _RangeAlready
    hit_assign, where, mask, coordinates, _ = expert_hit_mask(
        function, preamble, loop, original, self_name=self_name, indices=None, sentinel=False, squeeze=True)
    expert = loop.target.id
    kept = _body(loop.body, where, expert, self_name, coordinates, mask)
    check_independent(function, loop, kept, expert)
    row, call, binding = _expert_call(function, kept, expert, self_name)
    _expert_only_indexes(kept, expert, {id(where.value.args[0].slice), id(row.slice)}, mask, self_name)
    # The rewrite: the expert through the ModuleListLoop (the layout's stacks, or its module), the binding of its
    # module dropped, the loop over range(...) and the accumulator handed to the ModuleListLoop after it.
    call.func = ast.Attribute(ast.Name(LOOP, ast.Load()), "expert", ast.Load())
    call.args = [ast.Name(expert, ast.Load()), call.args[0]]
    into_range_loop(function, loop, [s for s in kept if s is not binding], hit_assign, containers, original)


def _signature(function) -> str:
    """The name of `self` (the first parameter), not reassigned."""
    a = function.args
    positional = a.posonlyargs + a.args
    if not positional:
        raise Refused("the forward takes no self")
    self_name = positional[0].arg
    if any(n.id == self_name for n in names(function, ast.Store)):
        raise Refused(f"the forward reassigns {self_name}")
    return self_name


def _body(body, where, expert: str, self_name: str, coordinates: set[str], mask: str) -> list:
    """The body's statements to keep: plain assignments without effects and the final index_add_; the guards
    after the torch.where are dropped. Anything else is refused."""
    accumulator = final_index_add(body[-1], coordinates)
    kept, after_where = [], False
    for statement in body[:-1]:
        if after_where and is_guard(statement, expert, self_name, coordinates):
            continue
        plain_assignment(statement)
        after_where = after_where or statement is where
        kept.append(statement)
    kept.append(body[-1])
    not_reassigned(kept, accumulator, mask, expert)
    # Another read would see the sums of the experts before this one: the iterations would not be independent.
    if len([n for s in kept for n in names(s, ast.Load) if n.id == accumulator]) != 1:
        raise Refused(f"the loop body reads {accumulator} besides adding into it")
    return kept


def _expert_call(function, kept, expert: str, self_name: str):
    """The one read of the expert module, `self.experts[e]`, and the one call of it: (the subscript, the call, the
    `layer = self.experts[e]` statement or None)."""
    module = f"{self_name}.experts[{expert}]"
    rows = [n for s in kept for n in ast.walk(s) if isinstance(n, ast.Subscript) and same(n, module)]
    if len(rows) != 1:
        raise Refused(f"the loop body reads {module} {len(rows)} times; once is expected")
    row = rows[0]
    parent = parents(kept)
    binding = next((s for s in kept if s.value is row), None)
    if binding is not None and len(binding.targets) == 1 and isinstance(binding.targets[0], ast.Name):
        layer = binding.targets[0].id
        stores = [n for n in names(function, ast.Store) if n.id == layer]
        loads = [n for n in names(function, ast.Load) if n.id == layer]
        call = parent.get(id(loads[0])) if len(stores) == 1 and len(loads) == 1 else None
        callee = loads[0] if loads else None
        shown = f"{layer}(<x>)"
    else:
        binding, call, callee, shown = None, parent.get(id(row)), row, f"{module}(<x>)"
    if not (isinstance(call, ast.Call) and call.func is callee and len(call.args) == 1 and not call.keywords
            and not isinstance(call.args[0], ast.Starred)):
        raise Refused(f"the expert module {module} is not used once, as {shown}")
    return row, call, binding


def _expert_only_indexes(kept, expert: str, allowed: set[int], mask: str, self_name: str) -> None:
    """The loop index appears only in `mask[e]` and `self.experts[e]` (see the module docstring)."""
    for statement in kept:
        for name in names(statement, ast.Load):
            if name.id == expert and id(name) not in allowed:
                raise Refused(f"`{text(statement)}` uses the expert index {expert} other than in {mask}[{expert}] "
                              f"and {self_name}.experts[{expert}]")

"""The syntax-tree checks and rewrites shared by the two derivations of a range loop from a class's own expert-hit
loop: transformers 5.x experts classes (transformers5_generic.py) and transformers 4.x MoE blocks
(transformers4_generic.py).

Both start from the loop transformers writes in either release,

    mask = one_hot(<indices>, num_classes=self.num_experts).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        ...
        pos, tok = torch.where(mask[e])
        ...plain assignments...
        acc.index_add_(0, tok, ...)

and turn it into `for e in range(_graph_moe_loop.num_experts)` followed by `acc = _graph_moe_loop.result(acc)`,
without the `hit` computation. Why that is exact, and what each derivation asks of the body beyond what is checked
here, is in their module docstrings. Every check raises `Refused` with a reason a user can read in the install
report.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import linecache
import textwrap
import types

import torch

LOOP = "_graph_moe_loop"  # the derived forward's added keyword-only parameter: what the loop asks of graph_moe


class Refused(Exception):
    """Why a forward cannot become a range loop."""


def parse(original: types.FunctionType) -> ast.FunctionDef:
    """The syntax tree of `original`'s own source: a plain function, not decorated, reading no closure variables."""
    if not isinstance(original, types.FunctionType):
        raise Refused("the forward is not a plain function")
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(original))).body[0]
    except (OSError, TypeError, SyntaxError) as e:
        raise Refused(f"its source cannot be read ({e})") from None
    if not isinstance(function, ast.FunctionDef):
        raise Refused("the forward is not a plain function")
    if function.decorator_list:
        raise Refused("the forward has decorators")
    if original.__code__.co_freevars:
        raise Refused("the forward reads closure variables")
    if any(isinstance(n, ast.Name) and n.id == LOOP or isinstance(n, ast.arg) and n.arg == LOOP
           for n in ast.walk(function)):
        raise Refused(f"the forward uses the name {LOOP}")
    return function


def define(function: ast.FunctionDef, original: types.FunctionType, how: str) -> types.FunctionType:
    """Compile the rewritten `function` against `original`'s globals, so `torch`, `nn`, `F`, ... mean what they
    meant there (Dynamo traces bytecode: no source file is needed; the new source is registered in linecache under
    a descriptive name, for tracebacks and Dynamo's logs). `how` completes "<qualname>, <how>" in that name."""
    # Annotations would be evaluated at definition here (the original's module may defer them): not needed.
    a = function.args
    for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
        if arg is not None:
            arg.annotation = None
    function.returns = None
    source = ast.unparse(ast.fix_missing_locations(function)) + "\n"
    where = getattr(original, "__qualname__", original.__name__)
    filename = f"<graph_moe: {original.__module__}.{where}, {how}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), original.__globals__, namespace)
    derived = namespace[function.name]
    derived.__qualname__ = where
    return derived


# ----------------------------------------------------------------------------------------------- reading the tree


def text(node) -> str:
    """`node` as source on one line, cut to 90 characters (for reasons)."""
    source = " ".join(ast.unparse(node).split())
    return source if len(source) <= 90 else source[:87] + "..."


def same(node, template: str) -> bool:
    """`node` is the expression `template` (syntax trees compared, positions ignored)."""
    return ast.dump(node) == ast.dump(ast.parse(template, mode="eval").body)


def resolves_to(node, original, target) -> bool:
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


def names(node, ctx) -> list[ast.Name]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)]


def assigned(statement) -> list[str]:
    return [n.id for n in names(statement, ast.Store)]


def parents(statements) -> dict[int, ast.AST]:
    """id(node) -> its parent, for every node under `statements`."""
    return {id(child): node for s in statements for node in ast.walk(s) for child in ast.iter_child_nodes(node)}


# ----------------------------------------------------------------------------------------------- the loop and its mask


def loop_and_preamble(function):
    """The one `for` loop, at the top level; the statements before it, those of `with` blocks (`torch.no_grad()`,
    `torch.autocast(...)`) included; and for each of those the top-level statement holding it."""
    loops = [n for n in ast.walk(function) if isinstance(n, (ast.For, ast.AsyncFor, ast.While))]
    if len(loops) != 1 or loops[0] not in function.body or not isinstance(loops[0], ast.For):
        raise Refused(f"the forward has {len(loops)} loops; one `for` at the top level is expected")
    loop = loops[0]
    if loop.orelse:
        raise Refused("the loop has an else clause")
    preamble, containers = [], {}
    for statement in function.body[:function.body.index(loop)]:
        inner = statement.body if isinstance(statement, ast.With) else [statement]
        preamble += inner
        containers.update((id(s), statement) for s in inner)
    return loop, preamble, containers


def iterates_hit(loop) -> tuple[str, str]:
    """(e, hit) of `for e in hit:`."""
    if not (isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Name)):
        raise Refused(f"the loop `for {text(loop.target)} in {text(loop.iter)}` is not over a name")
    return loop.target.id, loop.iter.id


def expert_hit_mask(function, preamble, loop, original, *, self_name: str, indices: str | None, sentinel: bool,
                    squeeze: bool):
    """Check the loop's expert-hit set and its mask; returns (the `hit = ...` statement, the `torch.where`
    statement, the mask's name, {pos, tok}, whether `hit` was squeezed to 0-d rows).

    `hit` must be bound once, before the loop, to the experts with tokens in the mask, computed after the mask is
    complete, and read by the loop header alone; the mask must be `one_hot(<indices>, num_classes=self.num_experts[
    + 1 if sentinel]).permute(2, 1, 0)` (any first argument where `indices` is None), read only there, by `hit` and
    by the body's one `pos, tok = torch.where(<mask>[e])` (`<mask>[e].squeeze(0)` too if `squeeze`: the squeeze is
    dropped, see `where_assignment`)."""
    expert, hit = iterates_hit(loop)
    hit_assign = _hit_assignment(function, preamble, hit)
    where, mask, coordinates = where_assignment(loop.body, expert, original, squeeze)
    squeezed = _check_hit(hit_assign, hit, mask, original)
    mask_stores = _mask_definition(function, preamble, mask, indices, self_name, original, sentinel)
    if preamble.index(hit_assign) < preamble.index(mask_stores[-1]):
        raise Refused(f"{hit} is computed before {mask} is complete")
    mask_readers = [s.value for s in mask_stores[1:]] + [hit_assign.value, where.value]
    allowed = {id(n) for reader in mask_readers for n in names(reader, ast.Load)}
    if any(id(n) not in allowed for n in names(function, ast.Load) if n.id == mask):
        raise Refused(f"{mask} is read outside the mask, hit and torch.where computations")
    return hit_assign, where, mask, coordinates, squeezed


def _hit_assignment(function, preamble, hit: str) -> ast.Assign:
    """`hit = ...`, the only binding of the loop's iterable, before the loop; read by the loop header alone."""
    stores = [n for n in names(function, ast.Store) if n.id == hit]
    assigns = [s for s in preamble if isinstance(s, ast.Assign) and hit in assigned(s)]
    if len(stores) != 1 or len(assigns) != 1 or len(assigns[0].targets) != 1 or assigned(assigns[0]) != [hit]:
        raise Refused(f"the loop's iterable {hit} is not bound once, by `{hit} = ...nonzero()`, before the loop")
    if len([n for n in names(function, ast.Load) if n.id == hit]) != 1:
        raise Refused(f"{hit} is read outside the loop header")
    return assigns[0]


def where_assignment(body, expert: str, original, squeeze: bool = False):
    """The body's `pos, tok = torch.where(<mask>[expert])`: (the statement, the mask's name, {pos, tok}).

    With `squeeze`, `torch.where(<mask>[expert].squeeze(0))` is taken too, and the squeeze dropped from the tree:
    indexed by a shape-(1,) row of `nonzero()` the mask row keeps a leading 1 that the squeeze removes; indexed by
    the range loop's int it has none, and squeeze(0) would wrongly drop the K dimension when top_k == 1."""
    wheres = [s for s in body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Call)
              and resolves_to(s.value.func, original, torch.where)]
    if len(wheres) != 1:
        raise Refused(f"the loop body has {len(wheres)} torch.where(...) assignments; one is expected")
    where = wheres[0]
    call = where.value
    if squeeze and len(call.args) == 1 and _is_squeeze_0(call.args[0]):
        call.args[0] = call.args[0].func.value
    target = where.targets[0] if len(where.targets) == 1 else None
    if not (len(call.args) == 1 and not call.keywords and isinstance(call.args[0], ast.Subscript)
            and isinstance(call.args[0].value, ast.Name) and same(call.args[0].slice, expert)
            and isinstance(target, ast.Tuple) and len(target.elts) == 2
            and all(isinstance(t, ast.Name) for t in target.elts)):
        raise Refused(f"`{text(where)}` is not `pos, tok = torch.where(<mask>[{expert}])`")
    return where, call.args[0].value.id, {t.id for t in target.elts}


def _is_squeeze_0(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "squeeze"
            and len(node.args) == 1 and not node.keywords and same(node.args[0], "0"))


def _check_hit(hit_assign, hit: str, mask: str, original) -> bool:
    """`hit` is the experts with tokens in `mask`, in ascending order (nonzero's), as rows or, squeezed, as 0-d
    tensors (returned: squeezed)."""
    value = hit_assign.value
    plain = f"torch.greater({mask}.sum(dim=(-1, -2)), 0).nonzero()"
    squeezed = same(value, plain + ".squeeze(-1)")
    nonzero = value.func.value if squeezed else value
    if not (same(nonzero, plain) and resolves_to(nonzero.func.value.func, original, torch.greater)):
        raise Refused(f"`{hit} = {text(value)}` is not the experts with tokens in {mask}, {plain}")
    return squeezed


def _mask_definition(function, preamble, mask: str, indices: str | None, self_name: str, original,
                     sentinel: bool) -> list[ast.Assign]:
    """The assignments that make `mask` = one_hot(indices, num_classes=E[ + 1]).permute(2, 1, 0), with a `+ 1`
    num_classes (expert parallelism's sentinel class, allowed with `sentinel`) rewritten to E."""
    stores = [s for s in preamble if isinstance(s, ast.Assign) and mask in assigned(s)]
    if len(stores) != len([n for n in names(function, ast.Store) if n.id == mask]):
        raise Refused(f"{mask} is assigned outside the statements before the loop")
    if not stores or len(stores) > 2 or any(len(s.targets) != 1 or not isinstance(s.targets[0], ast.Name)
                                            for s in stores):
        raise Refused(f"{mask} is not made by one_hot(...) and permute(2, 1, 0)")
    hot = stores[0].value
    permuted = len(stores) == 2 and same(stores[1].value, f"{mask}.permute(2, 1, 0)")
    if len(stores) == 1 and _is_permute_210(hot):
        hot, permuted = hot.func.value, True
    if not permuted:
        raise Refused(f"{mask} does not put the expert dimension first with permute(2, 1, 0)")
    if not (isinstance(hot, ast.Call) and resolves_to(hot.func, original, torch.nn.functional.one_hot)):
        raise Refused(f"{mask} is not made by torch.nn.functional.one_hot")
    shown = indices or "<indices>"
    if len(hot.args) + len(hot.keywords) != 2 or not hot.args or (indices and not same(hot.args[0], indices)):
        raise Refused(f"{mask} is not one_hot({shown}, num_classes=...)")
    holder = hot.args if len(hot.args) == 2 else hot.keywords[0]
    if holder is not hot.args and holder.arg != "num_classes":
        raise Refused(f"{mask} is not one_hot({shown}, num_classes=...)")
    classes = hot.args[1] if holder is hot.args else holder.value
    experts = f"{self_name}.num_experts"
    if sentinel and same(classes, f"{experts} + 1"):  # the expert-parallel sentinel's class, never visited
        classes = ast.parse(experts, mode="eval").body
        if holder is hot.args:
            hot.args[1] = classes
        else:
            holder.value = classes
    elif not same(classes, experts):
        raise Refused(f"one_hot has num_classes={text(classes)}, not {experts}" + (" (+ 1)" if sentinel else ""))
    return stores


def _is_permute_210(node) -> bool:
    """`<x>.permute(2, 1, 0)`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and same(node, f"({ast.unparse(node.func.value)}).permute(2, 1, 0)"))


# ----------------------------------------------------------------------------------------------- the body


def is_guard(statement, expert: str, self_name: str, coordinates: set[str]) -> bool:
    """`if e == self.num_experts: continue` (never true in the range loop) or `if tok.numel() == 0: continue` /
    `if tok.shape[0] == 0: continue` (an expert without tokens adds nothing either way)."""
    if not (isinstance(statement, ast.If) and not statement.orelse and len(statement.body) == 1
            and isinstance(statement.body[0], ast.Continue)):
        return False
    if same(statement.test, f"{expert} == {self_name}.num_experts"):
        return True
    return any(same(statement.test, f"{c}.numel() == 0") or same(statement.test, f"{c}.shape[0] == 0")
               for c in coordinates)


def no_side_effect(expression, where: str) -> None:
    """`expression` calls no in-place method (`x.mul_(...)`), writes through no `out=`, binds or yields nothing."""
    for node in ast.walk(expression):
        if isinstance(node, (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await, ast.Lambda)):
            raise Refused(f"{where} holds {type(node).__name__}")
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_") \
                    and not node.func.attr.startswith("_"):
                raise Refused(f"{where} calls the in-place {node.func.attr}")
            if any(k.arg == "out" for k in node.keywords):
                raise Refused(f"{where} writes through out=")


def plain_assignment(statement) -> None:
    """`statement` assigns to names only, and its value has no side effect."""
    if not isinstance(statement, ast.Assign):
        raise Refused(f"the loop body holds `{text(statement)}`: only plain assignments, the guards and "
                      "the final index_add_ are understood")
    for t in statement.targets:
        elements = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        if not all(isinstance(x, ast.Name) for x in elements):
            raise Refused(f"`{text(statement)}` assigns to something other than a name")
    no_side_effect(statement.value, f"`{text(statement)}`")


def final_index_add(last, coordinates: set[str]) -> str:
    """The body's last statement is `<acc>.index_add_(0, <a torch.where output>, <source without effects>)`;
    returns acc."""
    add = last.value if isinstance(last, ast.Expr) else None
    if not (isinstance(add, ast.Call) and isinstance(add.func, ast.Attribute) and add.func.attr == "index_add_"
            and isinstance(add.func.value, ast.Name) and len(add.args) == 3 and not add.keywords
            and same(add.args[0], "0") and isinstance(add.args[1], ast.Name) and add.args[1].id in coordinates):
        raise Refused(f"the loop does not end with `<acc>.index_add_(0, <a torch.where output>, ...)` "
                      f"(it ends with `{text(last)}`)")
    no_side_effect(add.args[2], "the index_add_ source")
    return add.func.value.id


def not_reassigned(kept, *protected: str) -> None:
    for name in protected:
        if any(name in assigned(s) for s in kept):
            raise Refused(f"the loop body reassigns {name}")


def check_independent(function, loop, kept, expert: str) -> None:
    """Each iteration reads only what it assigned itself or what the loop does not assign; nothing after the loop
    reads what the loop assigned."""
    in_loop = {expert} | {name for s in kept for name in assigned(s)}
    bound = {expert}
    for statement in kept:
        for name in names(statement.value, ast.Load):
            if name.id in in_loop and name.id not in bound:
                raise Refused(f"`{text(statement)}` reads {name.id} before this iteration assigns it")
        bound.update(assigned(statement))
    outside = [s for s in function.body if s is not loop]
    leaked = {n.id for s in outside for n in names(s, ast.Load)} & in_loop
    if leaked:
        raise Refused(f"{', '.join(sorted(leaked))}, assigned in the loop, is read outside it")


# ----------------------------------------------------------------------------------------------- the rewrite


def into_range_loop(function, loop, kept, hit_assign, containers, original) -> None:
    """Rewrite in place: loop over `range(_graph_moe_loop.num_experts)` (a new keyword-only parameter) with the body
    `kept`, hand the accumulator to `_graph_moe_loop.result` after the loop, and drop the `hit` computation."""
    if "range" in original.__globals__:
        raise Refused("the module shadows range")
    function.args.kwonlyargs.append(ast.arg(LOOP))
    function.args.kw_defaults.append(None)
    loop.iter = ast.parse(f"range({LOOP}.num_experts)", mode="eval").body
    loop.body = kept
    accumulator = kept[-1].value.func.value.id
    function.body.insert(function.body.index(loop) + 1,
                         ast.parse(f"{accumulator} = {LOOP}.result({accumulator})").body[0])
    container = containers[id(hit_assign)]
    if container is hit_assign:
        function.body.remove(hit_assign)
    else:
        container.body.remove(hit_assign)
        container.body = container.body or [ast.Pass()]

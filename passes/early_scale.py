"""Scale each row by its routing weight before the expert's last linear layers, not after them.

The body ends `down(h) * weight_of_row`. `down` is linear in h (a GEMM without bias, plus LoRA's A then B times a
constant, casts, dropout), so `down(h * weight_of_row)` is the same value (up to bf16 rounding), and cheaper:
- the backward of `y * w` keeps y (rows x hidden: 537 MB at 16384 tokens, Qwen3-30B-A3B shape) to form w's
  gradient; the backward of `h * w` needs h, which Inductor recomputes from the gate/up output it keeps anyway;
- `h * w` fuses into the activation kernel that writes h; w's gradient reduces over the intermediate size.
The plan is only an optimization: a body it cannot read this way is emitted as traced.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch.fx as fx

from .ops import CASTS, LAYOUT, example_value, op_name
from .prove_bodies import ProvenLoop

_COPIES = CASTS | {"contiguous", "clone"}


@dataclasses.dataclass
class EarlyScale:
    product: fx.Node  # y * w, the body's scaled output
    y: fx.Node  # down(h)
    scale: fx.Node  # w, each row's routing weight (rows, 1)
    rows: fx.Node  # h, the last value that is not linear in what came before: scaled instead
    first: list[fx.Node]  # the template nodes `scale` depends on, to emit before `rows`


def plan_early_scale(loop: ProvenLoop) -> EarlyScale | None:
    template = set(loop.template)
    product = _product(loop, template)
    if product is None:
        return None
    y, w = product.args
    return _plan(loop, template, product, y, w) or _plan(loop, template, product, w, y)


def _plan(loop: ProvenLoop, template: set[fx.Node], product: fx.Node, y, scale) -> EarlyScale | None:
    if not (isinstance(y, fx.Node) and y in template and isinstance(scale, fx.Node)):
        return None
    linears = {g.node: g for g in loop.linears}
    chain, frontier = set(), set()
    _walk(y, template, linears, chain, frontier)
    if len(frontier) != 1:
        return None
    (rows,) = frontier
    if rows is y or rows in linears:  # nothing linear to move past, or a grouped linear with a bias
        return None
    first = _ancestors_in(scale, template)
    if rows in first or first & chain:
        return None  # the scale depends on the expert's own computation
    if any(u not in chain for u in rows.users) or any(u not in chain and u is not product
                                                      for n in chain for u in n.users):
        return None  # a value on the way is also read elsewhere
    values = [example_value(n) for n in (rows, y, scale, product)]
    if any(v is None for v in values) or values[0].dtype != values[1].dtype or not values[2].dtype.is_floating_point:
        return None
    if values[3].dtype != values[1].dtype and not _cast_back(product, values[1].dtype):
        return None  # a float32 product kept in float32 (DeepSeek's loop adds in float32): scaled after, as traced
    if values[2].dim() != 2 or values[2].shape[-1] != 1 or values[0].dim() != 2:
        return None  # one weight per row, rows of features
    order = {n: i for i, n in enumerate(loop.template)}
    return EarlyScale(product, y, scale, rows, sorted(first, key=order.__getitem__))


def _product(loop: ProvenLoop, template: set[fx.Node]) -> fx.Node | None:
    """The mul that makes the rows added to the accumulator, under casts."""
    node = next(s.source for s in loop.candidate.steps if s.expert == 0)
    while isinstance(node, fx.Node) and op_name(node) in _COPIES and node in template:
        node = node.args[0]
    if isinstance(node, fx.Node) and op_name(node) == "mul" and len(node.args) == 2 and not node.kwargs:
        return node
    return None


def _cast_back(product: fx.Node, dtype) -> bool:
    """The product (float32: a float32 routing weight) is only read by a cast back to `dtype` (transformers 5.x
    Mixtral): then h * w cast to h's dtype before the linears rounds as often as y * w cast after them."""
    users = list(product.users)
    value = example_value(users[0]) if len(users) == 1 and op_name(users[0]) in CASTS else None
    return value is not None and value.dtype == dtype


def _walk(node: fx.Node, template: set[fx.Node], linears: dict, chain: set, frontier: set) -> None:
    """Follow `node` back through ops linear in their one body input (into `chain`); the values where that stops
    go into `frontier`."""
    if node in chain:
        return
    body_args = [a for a in node.args if isinstance(a, fx.Node) and a in template]
    if any(isinstance(v, fx.Node) and v in template for v in node.kwargs.values()):
        frontier.add(node)
        return
    name, first_is_body = op_name(node), bool(node.args) and node.args[0] in body_args
    if node in linears:  # x @ w[e], without a bias
        linear = linears[node].biases is None and len(body_args) == 1 and first_is_body
    elif name in ("add", "sub"):
        linear = len(body_args) == 2 == len(node.args)
    elif name in ("mul", "truediv"):  # by a constant (LoRA's scaling)
        linear = (len(body_args) == 1 and (first_is_body or name == "mul")
                  and all(_is_number(a) for a in node.args if a is not body_args[0]))
    else:  # casts, dropout, row-wise layout changes
        linear = name in _COPIES | LAYOUT | {"dropout"} and len(body_args) == 1 and first_is_body
    if not linear:
        frontier.add(node)
        return
    chain.add(node)
    for a in body_args:
        _walk(a, template, linears, chain, frontier)


def _ancestors_in(node: fx.Node, template: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in template and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _is_number(a) -> bool:
    return isinstance(a, numbers.Number) and not isinstance(a, bool)

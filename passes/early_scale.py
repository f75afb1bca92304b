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

from .ops import LAYOUT, example_value, op_name
from .prove_bodies import ProvenLoop

_CASTS = {"to", "type", "float", "half", "bfloat16", "double", "contiguous", "clone"}
_DROPOUT = {"dropout"}


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
    y, scale = product.args
    if scale in template and y not in template or _is_number(y):
        y, scale = scale, y
    if not isinstance(y, fx.Node) or y not in template or not isinstance(scale, fx.Node):
        return None
    linear_weights = {g.node: g for g in loop.linears}
    chain, frontier = set(), set()
    if not _walk(y, template, linear_weights, chain, frontier) or len(frontier) != 1:
        return None
    (rows,) = frontier
    if rows in linear_weights:
        return None  # a grouped linear with a bias: scaled after it, as traced
    first = _ancestors_in(scale, template)
    if rows in first or first & chain or rows is y:
        return None
    if any(u not in chain for u in rows.users) or any(u not in chain and u is not product
                                                      for n in chain for u in n.users):
        return None
    values = [example_value(n) for n in (rows, y, scale, product)]
    if any(v is None for v in values) or len({v.dtype for v in values}) != 1:
        return None  # the product in another dtype than its factors: a cast to move too
    if values[2].dim() != 2 or values[2].shape[-1] != 1 or values[0].dim() != 2:
        return None  # one weight per row, rows of features
    order = {n: i for i, n in enumerate(loop.template)}
    return EarlyScale(product, y, scale, rows, sorted(first, key=order.__getitem__))


def _product(loop: ProvenLoop, template: set[fx.Node]) -> fx.Node | None:
    """The mul that makes the rows added to the accumulator, under casts."""
    node = next(s.source for s in loop.candidate.steps if s.expert == 0)
    while isinstance(node, fx.Node) and op_name(node) in _CASTS and node in template:
        node = node.args[0]
    if isinstance(node, fx.Node) and op_name(node) == "mul" and len(node.args) == 2 and not node.kwargs:
        return node
    return None


def _walk(node, template, linears, chain: set, frontier: set) -> bool:
    """Follow `node` back through ops linear in one body value; that value goes in `frontier`. False when the
    walk meets a value that is neither (e.g. a bias added)."""
    if node in chain:
        return True
    name = op_name(node)
    body_args = [a for a in node.args if isinstance(a, fx.Node) and a in template]
    body_kwargs = [v for v in node.kwargs.values() if isinstance(v, fx.Node) and v in template]
    if body_kwargs:
        frontier.add(node)
        return True
    if node in linears:
        linear_in_x = linears[node].biases is None and len(body_args) == 1 and node.args[0] is body_args[0]
    elif name in ("add", "sub"):
        linear_in_x = len(body_args) == 2 and len(node.args) == 2
    elif name in ("mul", "truediv"):
        linear_in_x = (len(body_args) == 1 and node.args[0] is body_args[0] if name == "truediv" else
                       len(body_args) == 1) and all(_is_number(a) for a in node.args if a is not body_args[0])
    elif name in _CASTS or name in _DROPOUT or name in LAYOUT:
        linear_in_x = len(body_args) == 1 and node.args[0] is body_args[0]
    else:
        linear_in_x = False
    if not linear_in_x:
        frontier.add(node)
        return True
    chain.add(node)
    return all(_walk(a, template, linears, chain, frontier) for a in body_args)


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

"""Emit the grouped form of a proven expert loop (the shape of torchtitan's grouped MoE):

    flat_expert_ids, token_order = sort(ids.flatten(), stable)   rows grouped by expert
    expert_offsets = searchsorted(flat_expert_ids, arange(E))    int32 end offsets, no host sync
    slot_of_row, grouped_offsets                                 each expert's rows padded to 16 bytes (8 rows
                                                                 in bf16), as torch._grouped_mm needs on CUDA
    token_index / slot_index = slot_of_row // K, slot_of_row % K the coordinates torch.where gave
    ... expert 0's body, once over all padded rows (S = tokens * top_k, plus at most 7 per expert), each
        per-expert linear as
        torch._grouped_mm(rows, stacked_weight.transpose(-2, -1), offs=grouped_offsets)
        (x @ stack[e] with an (E, in, out) stack: torch._grouped_mm(rows, stack, offs=...), no transpose),
        each per-expert element-wise operand (a bias added after x @ w[e]) as stack[sorted_expert_ids]
    combined = unsort_rows(rows, row_of_slot, slot_of_row).unflatten(0, (-1, K)), slot 0 + ... + slot K-1

The combine un-permutes and adds the k slots: a gather (whose backward is a gather too, or a scatter without
padding rows, graph_moe/kernels/row_order.py) and k - 1 elementwise adds, one fused kernel; no atomics forward or backward.
Every new node gets an `example_value`, computed on the graph's fake tensors.
"""

from __future__ import annotations

import operator
import os
import re

import torch
import torch._inductor.config as inductor_config
import torch.fx as fx

from torch._dynamo.utils import _disable_saved_tensors_hooks_during_tracing, counters
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import CheckpointPolicy

import graph_moe.kernels  # noqa: F401  (registers the torch.ops.graph_moe ops emitted here)
from graph_moe.kernels.grouped_chunks import grouped_mm_in_chunks, groups_per_call

from .match_router_topk import replace_router_topk
from .match_swiglu import swiglu_input
from .ops import (CASTS, ELEMENTWISE, LAYOUT, ZERO_FACTORIES, cast_signature, example_value, is_inplace,
                  op_name, slice_source)
from .early_scale import plan_early_scale
from .prove_bodies import ProvenLoop, Unprovable
from .settings import RewriteSettings
from .traced_once import remove_marker


def _fake_mode(node: fx.Node):
    val = example_value(node)
    return getattr(val, "fake_mode", None)  # Dynamo's own mode; the backend's context has a fresh one


class _Builder:
    """Inserts named nodes before `anchor`, each with its fake example value."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode
        self.new: list[fx.Node] = []
        self.sink: list[fx.Node] = []  # pure producers of weight stacks, moved to their first use once rewritten

    def _finish(self, node: fx.Node, name: str | None):
        self.new.append(node)
        if name:
            node._rename(name)
        args = fx.node.map_arg(node.args, example_value)
        kwargs = fx.node.map_arg(node.kwargs, example_value)
        # Saved-tensor hooks of the caller (non-reentrant checkpointing) must not see these fake computations.
        with self.fake_mode, _disable_saved_tensors_hooks_during_tracing():
            if node.op == "call_method":
                val = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                val = node.target(*args, **kwargs)
        node.meta["example_value"] = val
        return node

    def call(self, fn, *args, name=None, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._finish(self.graph.call_function(fn, args, kwargs), name)

    def method(self, method, *args, name=None, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._finish(self.graph.call_method(method, args, kwargs), name)

    def copy(self, node: fx.Node, env: dict) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            new = self.graph.node_copy(node, lambda n: env.get(n, n))
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "source_fn_stack", "stack_trace")}
        return self._finish(new, None)

    def size(self, node: fx.Node, dim: int):
        s = example_value(node).shape[dim]
        return s if isinstance(s, int) else self.method("size", node, dim)


def _stack(b: _Builder, tensors: list[fx.Node], name: str) -> fx.Node:
    """(E, *shape) from E per-expert tensors: the stacked tensor itself when expert e reads stack[e], else a copy."""
    sources = [slice_source(t) for t in tensors]
    if all(sources) and all(s[0] is sources[0][0] and s[1] == e and cast_signature(s[2]) == cast_signature(
            sources[0][2]) for e, s in enumerate(sources)):
        base, _, cast = sources[0]
        val, one = example_value(base), example_value(tensors[0])
        if (isinstance(val, torch.Tensor) and isinstance(one, torch.Tensor) and val.dim() == one.dim() + 1
                and statically_known_true(val.shape[0] == len(tensors))):
            # stack[e].float() for every e: the whole stack cast once (a copy: recomputed in the backward)
            if cast is not None:
                return _recompute_in_backward(b.copy(cast, {cast.args[0]: base}))
            b.sink.extend(_recompute_producers(base))
            return base
    return _recompute_in_backward(b.call(torch.ops.graph_moe.stack_weights, list(tensors), name=name))


def _cast_like(b: _Builder, value: fx.Node, like: fx.Node) -> fx.Node:
    """`value` in the dtype `like` had in the traced body."""
    dtype = example_value(like).dtype
    return value if example_value(value).dtype == dtype else b.method("to", value, dtype)


def _recompute_in_backward(node: fx.Node) -> fx.Node:
    """Tag a copy of per-expert weights (and views of it) to be recomputed in the backward rather than saved.

    Saved, it would keep a second copy of every layer's expert weights alive from forward to backward (full
    fine-tuning without the grouped layout), and under FSDP2 an unsharded copy of weights FSDP2 frees after the
    forward. Recomputed, the backward stacks again from the per-expert weights, which autograd keeps anyway
    (FSDP2 all-gathers them again before the layer's backward). AOTAutograd carries the tag to every aten node
    traced from this one, and its partitioners honour it, as for activation checkpointing."""
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    return node


_NOT_PURE = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "empty")


def _recompute_producers(stack: fx.Node, limit: int = 12) -> list[fx.Node]:
    """A stack the graph computes from parameters with pure ops (the 4-bit layout's one `dequantize_4bit` per
    projection and its views): tagged to be recomputed in the backward, like `_recompute_in_backward`'s copies,
    instead of saving a dequantized bf16 copy of every layer's experts. Left alone if anything on the way is
    not plainly pure, or the way is long. Returns the tagged nodes (for `_sink_to_first_use`)."""
    todo, chain = [stack], []
    while todo:
        node = todo.pop()
        if node.op in ("placeholder", "get_attr") or node in chain:
            continue
        name = op_name(node)
        known = name in LAYOUT | CASTS | ELEMENTWISE or (node.op == "call_function" and "out" not in node.kwargs
                                                        and _pure_op(node.target))
        if (node.op not in ("call_function", "call_method") or not known or is_inplace(node)
                or any(w in name.lower() for w in _NOT_PURE) or len(chain) >= limit):
            return []
        chain.append(node)
        todo.extend(node.all_input_nodes)
    for node in chain:
        _recompute_in_backward(node)
    return chain


def _sink_to_first_use(graph: fx.Graph, nodes) -> None:
    """Move pure nodes down to just before their first user, last producer first; erase those nothing reads any
    more (the dequantized 4-bit stack where the grouped GEMM reads the packed one, graph_moe/kernels/grouped_mm_4bit.py).

    The traced forward computes every stack before the loop (`ExpertLayout.stacks()`), so the 4-bit layout's
    dequantized gate+up and down stacks (805 and 403 MB at the Qwen3-30B-A3B shape) were alive together; moved next
    to its grouped GEMM, each is freed before the next is made. Moving a node later keeps its inputs before it."""
    start = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted({n for n in nodes if n in start}, key=start.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(node.users, key=order.__getitem__)
        if order[first] > order[node] + 1:
            first.prepend(node)


def _pure_op(target) -> bool:
    """A registered operator that writes none of its arguments: an overload, or a packet called without out=
    (its default overload)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None)
    return isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable


def _is_recomputed(node) -> bool:
    return isinstance(node, fx.Node) and node.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE


def _projection_name(weight: fx.Node) -> str:
    """'gate_proj' for L['self']._modules['experts']._modules['0']._modules['gate_proj']._parameters['weight']:
    the module path after the expert index, without the generic words."""
    if slice_source(weight) is not None:  # stack[e]: name it after the stack
        weight = slice_source(weight)[0]
    source = getattr(weight.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    text = (name() if callable(name) else name) or weight.name
    text = re.split(r"\['\d+'\]|\[\d+\]|_modules_\d+_", text)[-1]
    words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text.replace("_modules_", ".").replace("_parameters_", "."))
             if w not in _NOT_NAMES and not w.startswith("_")]
    return ".".join(words) or weight.name


_NOT_NAMES = {"L", "self", "weight", "bias", "base_layer", "default", "modules", "parameters"}


def emit(loop: ProvenLoop, settings: RewriteSettings = RewriteSettings()) -> list[tuple[str, bool]]:
    """Rewrite the loop in place, as `settings` say; returns each grouped GEMM's name and whether it took the fallback op."""
    cand = loop.candidate
    graph = cand.accumulator.graph
    fake_mode = _fake_mode(cand.ids)
    if fake_mode is None:
        raise Unprovable("the graph carries no fake tensors to size the rewrite")
    b = _Builder(graph, loop.last_step, fake_mode)
    try:
        result, projections = _emit_grouped(b, loop, settings)
    except Exception as e:  # leave the graph exactly as traced
        _drop(graph, b.new)
        if os.environ.get("GRAPH_MOE_DEBUG"):
            raise
        raise e if isinstance(e, Unprovable) else Unprovable(f"internal error while rewriting: {e!r}") from e
    _reroute(loop, result)
    _sink_to_first_use(graph, b.sink)
    if settings.router_topk:
        counters["graph_moe"]["router_topk"] += replace_router_topk(loop.candidate.ids, fake_mode)
    # Counted once the rewrite stands: each stack copies E per-expert tensors on every forward (README "Weights").
    counters["graph_moe"]["weight_stacks_per_forward"] += sum(node.target is torch.ops.graph_moe.stack_weights for node in b.new)
    return projections


def _emit_grouped(b: _Builder, loop: ProvenLoop, settings: RewriteSettings):
    cand = loop.candidate
    ids = cand.ids
    ids_val = example_value(ids)
    # Routing: sort the (token, slot) pairs by expert.
    flat_ids = b.method("reshape", ids, -1, name="flat_expert_ids")
    rows = b.size(flat_ids, 0)
    sorted_ids, token_order = _sort_by_expert(b, flat_ids, rows, cand.num_experts)
    experts = b.call(torch.arange, cand.num_experts, device=ids_val.device, name="expert_range")
    offsets = b.call(torch.searchsorted, sorted_ids, experts, right=True, out_int32=True, name="expert_offsets")
    align = _row_alignment(loop)
    slot_of_row, grouped_offsets, padded_rows, padding_rows = _aligned_groups(b, sorted_ids, token_order, offsets,
                                                                              rows, cand.num_experts, align)
    row_of_slot = _inverse(b, slot_of_row, rows)
    k = b.size(ids, 1)
    token_dim = cand.mask_dims[1 + loop.token_output]  # the ids dim that indexes accumulator rows
    names = ("token_index", "slot_index") if token_dim == 0 else ("slot_index", "token_index")
    # Padding rows read the last (token, slot): any valid row will do, their results are dropped in the combine.
    real_slot = b.method("clamp_max", slot_of_row, b.call(operator.sub, rows, 1) if isinstance(rows, fx.Node)
                         else rows - 1, name="row_slot")
    coords_by_dim = [b.call(operator.floordiv, real_slot, k, name=names[0]),
                     b.call(operator.mod, real_slot, k, name=names[1])]
    # torch.where(mask[e]) output j is a coordinate along ids dim mask_dims[1 + j].
    coords = [coords_by_dim[cand.mask_dims[1 + j]] for j in range(2)]
    row_expert = None
    if loop.per_expert or any(g.biases for g in loop.linears):  # each row's expert, padding rows included
        row_range = b.call(torch.arange, padded_rows, dtype=torch.int32, device=ids_val.device, name="row_range")
        row_expert = b.call(torch.searchsorted, grouped_offsets, row_range, right=True, name="row_expert")

    env: dict[fx.Node, fx.Node] = {n: coords[j] for n, j in loop.coords.items()}
    for operand in loop.per_expert:  # each row reads its own expert's value
        env[operand.node] = b.call(operator.getitem, _stack(b, operand.values, "per_expert"), row_expert,
                                   name="row_" + re.sub(r"\W", "_", _projection_name(operand.node)))
    linears = {g.node: g for g in loop.linears}
    fused = _fusable_pairs(loop.linears) if settings.fuse_projections else {}
    projections = []
    early = plan_early_scale(loop)
    order = loop.template
    if early is not None:  # the routing weight first: the rows are scaled by it as soon as they are computed
        first = set(early.first)
        order = early.first + [n for n in loop.template if n not in first]
    for node in order:
        if node in env:
            continue
        if token_dim == 0 and isinstance(k, int) and _gathers_token_rows(node, loop):
            # x[top_x]: rows moved into expert order (a scatter from token order, or a gather), whose gradient adds
            # each token's k rows by gathering them (graph_moe/kernels/row_order.py)
            env[node] = b.call(torch.ops.graph_moe.gather_token_rows, node.args[0], env[node.args[1]], row_of_slot, k,
                               padding_rows, name="token_rows")
            continue
        if early is not None and node is early.product:  # its rows were scaled before the linears (early_scale.py)
            env[node] = _cast_like(b, env[early.y], node)
            continue
        if early is not None and node is early.rows:
            env[node] = _cast_like(b, _scaled_by_routing_weight(b, b.copy(node, env), env[early.scale]), node)
            continue
        if node in linears:
            g = linears[node]
            partner = fused.get(node)
            if partner is not None and partner.node in env:
                continue  # computed with its partner
            x = env.get(node.args[0], node.args[0])
            if partner is not None:
                names = f"{_projection_name(g.weights[0])}+{_projection_name(partner.weights[0])}"
                w_a, w_b = _stack(b, g.weights, "w_a"), _stack(b, partner.weights, "w_b")
                out_dim = 1 if g.transposed else 2  # (E, out, in) or (E, in, out)
                w = b.call(torch.cat, [w_a, w_b], out_dim, name="stacked_weight")
                if _is_recomputed(w_a) or _is_recomputed(w_b):
                    _recompute_in_backward(w)
                out, fallback = _grouped(b, x, w, grouped_offsets, [g, partner], row_expert, names,
                                         settings.low_memory_4bit)
                split = b.method("split", out, [b.size(w_a, out_dim), b.size(w_b, out_dim)], -1)
                env[node] = b.call(operator.getitem, split, 0, name=re.sub(r"\W", "_", _projection_name(g.weights[0])))
                env[partner.node] = b.call(operator.getitem, split, 1,
                                           name=re.sub(r"\W", "_", _projection_name(partner.weights[0])))
                projections.append((names, fallback))
            else:
                name = _projection_name(g.weights[0])
                w = _stack(b, g.weights, "stacked_weight")
                env[node], fallback = _grouped(b, x, w, grouped_offsets, [g], row_expert, name,
                                               settings.low_memory_4bit)
                projections.append((name, fallback))
            continue
        env[node] = b.copy(node, env)

    for node in fused:  # a fused linear's own cast of the rows, left unread when its partner's cast was read
        own_input = env.get(node.args[0])
        if isinstance(own_input, fx.Node) and not own_input.users and op_name(own_input) in CASTS:
            b.graph.erase_node(own_input)
    rows_out = env[next(s.source for s in cand.steps if s.expert == 0)]
    # Back to (token, slot) order by a gather whose gradient moves rows back without atomics (a scatter, or a gather;
    # graph_moe/kernels/row_order.py), fused with the slot adds.
    by_token = b.call(torch.ops.graph_moe.unsort_rows, rows_out, row_of_slot, slot_of_row, padding_rows,
                      name="rows_by_token")
    by_token = b.method("unflatten", by_token, 0, (-1, k), name="rows_by_token_slot")
    combined = b.call(torch.ops.graph_moe.add_slots, by_token, 1 - token_dim, name="expert_output")

    acc = cand.accumulator
    acc_val, comb_val = example_value(acc), example_value(combined)
    same_shape = acc_val.dim() == comb_val.dim() and all(
        torch.fx.experimental.symbolic_shapes.statically_known_true(a == c)
        for a, c in zip(acc_val.shape, comb_val.shape))
    if not same_shape or acc_val.dtype != comb_val.dtype:
        raise Unprovable(f"the accumulator {tuple(acc_val.shape)} {acc_val.dtype} does not match the "
                         f"combined rows {tuple(comb_val.shape)} {comb_val.dtype}")
    result = combined if op_name(acc) in ZERO_FACTORIES else b.call(operator.add, acc, combined, name="moe_output")
    return result, projections


def _scaled_by_routing_weight(b: _Builder, hidden: fx.Node, weight: fx.Node) -> fx.Node:
    """hidden * weight, the rows scaled before the down projection (early_scale.py); silu(gate) * up * w as one op
    whose backward reads each row once (graph_moe/kernels/swiglu.py). The weight (rows x 1) is saved for the backward: recomputed,
    Inductor gathered it again through the int64 token and slot numbers in every element of the activation's
    gradient kernel."""
    weight.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    swiglu = swiglu_input(hidden, weight)
    if swiglu is None:
        return b.call(operator.mul, hidden, weight, name="rows_times_routing_weight")
    gu, replaced = swiglu
    scaled = b.call(torch.ops.graph_moe.swiglu_scaled, gu, weight, name="rows_times_routing_weight")
    _drop(b.graph, replaced)
    return scaled


def _gathers_token_rows(node: fx.Node, loop: ProvenLoop) -> bool:
    """x[top_x] with x (tokens, hidden) from outside the body and top_x the token coordinate torch.where gave."""
    if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2):
        return False
    src, index = node.args
    return (isinstance(src, fx.Node) and isinstance(index, fx.Node) and loop.coords.get(index) == loop.token_output
            and src not in loop.template and example_value(src).dim() == 2 and example_value(node).dim() == 2)


def _row_alignment(loop: ProvenLoop) -> int:
    """Rows per 16 bytes of the grouped GEMMs' inputs (8 in bf16) when some grouped weight is trained (LoRA
    adapters, experts): their weight-gradient GEMMs group along the rows (see `_aligned_groups`). 1 otherwise:
    the forward and input-gradient GEMMs group along the rows of row-major inputs, which need no alignment,
    and frozen experts then skip the padding's few small kernels."""
    trained = any(getattr(example_value(w), "requires_grad", False) for g in loop.linears for w in g.weights)
    sizes = [example_value(g.node.args[0]).dtype.itemsize for g in loop.linears]
    return max(1, 16 // min(sizes)) if trained and sizes else 1


# Inductor sorts at most this many elements with a Triton bitonic sort of its own (ir.Sort.create), longer or
# dynamic-length sorts with ATen's; that Triton kernel took 7 of a layer's 28 s to compile (H200, 64 tokens, top-8).
_INDUCTOR_TRITON_SORT_MAX = 512


def _sort_by_expert(b: _Builder, flat_ids: fx.Node, rows, num_experts: int):
    """(sorted expert ids, token order): a stable sort of the (token, slot) pairs by expert.

    The keys are int16 where the expert count fits: ATen's radix sort makes one pass per key byte, 2 instead of 8.
    A short static-length sort gets sentinel ids (num_experts, after every expert: stable, so they sort last) past
    Inductor's Triton-sort limit, and the first `rows` results are kept: ATen's sort, a kernel less to compile."""
    narrow = num_experts < torch.iinfo(torch.int16).max
    keys = b.method("to", flat_ids, torch.int16, name="expert_keys") if narrow else flat_ids
    padded = isinstance(rows, int) and rows <= _INDUCTOR_TRITON_SORT_MAX
    if padded:
        pad = b.method("new_full", keys, (_INDUCTOR_TRITON_SORT_MAX + 1 - rows,), num_experts, name="sort_sentinels")
        keys = b.call(torch.cat, [keys, pad], name="padded_expert_keys")
    sort = b.call(torch.sort, keys, stable=True, name="sort_by_expert")
    sorted_ids = b.call(operator.getitem, sort, 0, name="sorted_expert_ids")
    token_order = b.call(operator.getitem, sort, 1, name="token_order")
    if padded:
        sorted_ids = b.call(operator.getitem, sorted_ids, slice(0, rows), name="sorted_expert_ids")
        token_order = b.call(operator.getitem, token_order, slice(0, rows), name="token_order")
    if narrow:  # back to the ids' dtype: searchsorted and indexing take them
        sorted_ids = b.method("to", sorted_ids, example_value(flat_ids).dtype, name="sorted_expert_ids")
    return sorted_ids, token_order


def _inverse(b: _Builder, slot_of_row, rows):
    """For each flat (token, slot) index, the grouped row that holds it: slot_of_row inverted (a scatter of row
    numbers; the padding rows, whose slot is `rows`, land on one extra entry, cut off)."""
    device = example_value(slot_of_row).device
    padded_rows = b.size(slot_of_row, 0)
    row_numbers = b.call(torch.arange, padded_rows, device=device, name="grouped_row")
    extra = b.call(operator.add, rows, 1) if isinstance(rows, fx.Node) else rows + 1
    inverse = b.method("index_put", b.call(torch.empty, extra, dtype=torch.int64, device=device, name="row_of_slot_empty"),
                       (slot_of_row,), row_numbers, name="row_of_slot_padded")
    return b.method("narrow", inverse, 0, 0, rows, name="row_of_slot")


def _aligned_groups(b: _Builder, sorted_ids, token_order, offsets, rows, num_experts: int, align: int):
    """Each expert's rows, padded to a multiple of `align` rows.

    torch._grouped_mm on CUDA needs every group to start on a 16-byte boundary along a dimension it groups when
    that dimension is the contiguous one: Inductor is free to lay out the saved rows or their gradients that way
    (the weight-gradient GEMMs of LoRA or trained experts group along the rows), and then groups of any size
    fail ("strides should be multiple of 16 bytes", or a device assert). Padded groups hold in every layout.
    The padded size is static (rows + E * (align - 1), rounded up), so no host sync; the last group takes
    the rows left at the end. Returns (slot_of_row: for each padded row, its flat (token, slot) index, `rows`
    for padding; the grouped GEMMs' int32 end offsets; the padded row count; the padding rows, as
    `_padding_rows` lists them, or None without padding)."""
    if align == 1:
        return token_order, offsets, rows, None
    device = example_value(sorted_ids).device
    zero = b.call(torch.zeros, 1, dtype=torch.int32, device=device, name="zero_offset")
    counts = b.call(torch.diff, offsets, prepend=zero, name="expert_rows")
    padded = b.call(operator.mul, b.call(operator.floordiv, b.call(operator.add, counts, align - 1), align), align,
                    name="expert_padded_rows")
    padded_ends = b.call(torch.cumsum, padded, 0, dtype=torch.int32, name="padded_ends")
    # row j of expert e moves by (padded start of e) - (start of e)
    shift = b.call(operator.sub, b.call(operator.sub, padded_ends, padded), b.call(operator.sub, offsets, counts),
                   name="expert_row_shift")
    positions = b.call(torch.arange, rows, device=device, name="sorted_row")
    position = b.call(operator.add, positions, b.call(operator.getitem, shift, sorted_ids), name="padded_row")
    if isinstance(rows, fx.Node):
        padded_rows = b.call(operator.mul, b.call(operator.floordiv, b.call(
            operator.add, rows, num_experts * (align - 1) + align - 1), align), align, name="padded_rows")
    else:
        padded_rows = (rows + num_experts * (align - 1) + align - 1) // align * align
    slot_of_row = b.method("index_put", b.call(torch.full, (padded_rows,), rows, dtype=torch.int64, device=device,
                                               name="padding_slots"), (position,), token_order, name="slot_of_row")
    last = b.method("new_full", padded_ends, (1,), padded_rows, name="padded_total")
    grouped_offsets = b.call(torch.cat, [b.call(operator.getitem, padded_ends, slice(None, -1)), last],
                             name="grouped_offsets")
    padding = _padding_rows(b, padded, counts, padded_ends, padded_rows, num_experts, align)
    return slot_of_row, grouped_offsets, padded_rows, padding


def _padding_rows(b: _Builder, padded, counts, padded_ends, padded_rows, num_experts: int, align: int):
    """The padding rows as a static-length int64 list (for the row scatters, which zero them; graph_moe/kernels/row_order.py):
    each expert's last padded - counts rows (fewer than `align`), then the rows past the last expert's padded end
    (fewer than E * (align - 1) + align). Unused entries are `padded_rows`, one past the end."""
    device = example_value(padded).device
    pads = b.call(operator.sub, padded, counts, name="expert_padding_rows")
    within = b.call(torch.arange, align - 1, dtype=torch.int32, device=device, name="padding_row_within")
    per_expert = b.call(operator.add, b.method("unsqueeze", b.call(operator.sub, padded_ends, pads), 1), within)
    per_expert = b.method("masked_fill", per_expert, b.call(operator.ge, within, b.method("unsqueeze", pads, 1)),
                          padded_rows, name="expert_padding_row")
    tail = b.call(operator.add, b.call(torch.arange, num_experts * (align - 1) + align, dtype=torch.int32,
                                       device=device), b.call(operator.getitem, padded_ends, slice(-1, None)))
    tail = b.method("clamp_max", tail, padded_rows, name="tail_padding_row")
    return b.method("to", b.call(torch.cat, [b.method("flatten", per_expert), tail]), torch.int64,
                    name="padding_rows")


def _reroute(loop: ProvenLoop, result: fx.Node):
    cand = loop.candidate
    graph = result.graph
    acc = cand.accumulator
    # Readers of the accumulator after the loop now read the result.
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = order[loop.last_step]
    final = loop.last_step if not cand.inplace else acc
    for user in list(final.users):
        if user not in loop.erase and order[user] > last:
            user.replace_input_with(final, result)
    for step in cand.steps:  # x.index_add_(...) returns x
        for user in list(step.index_add.users):
            if user not in loop.erase:
                user.replace_input_with(step.index_add, result)
    if cand.marker is not None:
        remove_marker(cand.marker)
    _erase_loop(graph, loop.erase)
    _drop_unused(graph, [cand.mask])


def _erase_loop(graph: fx.Graph, nodes) -> None:
    """Erase the traced loop, last node first, except what the rewrite still reads: the per-expert weight slices it
    stacks when the experts read a stack it cannot take whole (one with more rows than experts). Those are reads
    of weights, never the loop's in-place steps, which nothing reads once the accumulator's readers are rerouted."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted((n for n in nodes if n in order), key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)
        elif is_inplace(n) or op_name(n) == "index_add_":
            raise AssertionError(f"graph_moe: the rewrite reads {n.format_node()}, a step of the loop it replaced")


def _grouped(b: _Builder, x, w, offsets, linears, row_expert, name, low_memory_4bit: bool = True):
    cast_to = _autocast_dtype(example_value(x), example_value(w), linears)
    if cast_to is not None:  # what autocast does to each per-expert linear: rows and weights in its dtype
        x = b.method("to", x, cast_to, name="rows_autocast")
        w = _recompute_in_backward(b.method("to", w, cast_to, name="weights_autocast"))
    fallback = not _fits_grouped_mm(example_value(x), example_value(w))
    per_call = groups_per_call(example_value(x), example_value(w))  # the CUDA kernel takes < 1024 groups
    four_bit = _four_bit_stack(w) if low_memory_4bit else None
    if not fallback and not per_call and four_bit is not None:  # dequantized a few experts at a time
        packed, absmax, shape, blocksize, quant_type = four_bit
        out = b.call(torch.ops.graph_moe.grouped_mm_4bit, x, packed, absmax, offsets, shape, blocksize, quant_type,
                     not linears[0].transposed, name=re.sub(r"\W", "_", name))
        return _plus_bias(b, out, linears, row_expert), fallback
    w_t = b.method("transpose", w, -2, -1) if linears[0].transposed else w  # (E, in, out) for _grouped_mm
    if w_t is not w and _is_recomputed(w):
        _recompute_in_backward(w_t)
    if not fallback and per_call:
        out = b.call(grouped_mm_in_chunks, x, w_t, offsets, per_call, name=re.sub(r"\W", "_", name))
    elif not fallback and _few_rows_op_fits(example_value(x), example_value(w_t)):
        out = b.call(torch.ops.graph_moe.grouped_mm_few_rows, x, w_t, offsets, name=re.sub(r"\W", "_", name))
    elif not fallback:
        out = b.call(torch._grouped_mm, x, w_t, offs=offsets, name=re.sub(r"\W", "_", name))
    else:  # the compiled torch._grouped_mm takes bfloat16 only
        out = b.call(torch.ops.graph_moe.grouped_mm, x, w_t, offsets, name=re.sub(r"\W", "_", name))
    return _plus_bias(b, out, linears, row_expert), fallback


def _few_rows_op_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """graph_moe::grouped_mm_few_rows stands in for torch._grouped_mm on CUDA where the weights need no gradient and
    Inductor captures CUDA graphs (mode="reduce-overhead" / "max-autotune"): it picks a Triton kernel on each call
    when the experts get few rows (graph_moe/kernels/grouped_mm_few_rows.py). Without CUDA graphs its host time (a custom op and a
    Triton launch from Python: 35 us more per call) costs more than its GPU time saves (H200, 512 tokens, forward
    back to back: 0.81 -> 0.93 ms; benchmarks/records/h200_torch2.11_qwen3_few_rows_kernel_layer_ab.json), so
    torch._grouped_mm stays."""
    return x.device.type == "cuda" and not w.requires_grad and bool(inductor_config.triton.cudagraphs)


def _plus_bias(b: _Builder, out, linears, row_expert):
    """The grouped GEMM's rows plus each row's expert's bias, where the linears have one."""
    if any(g.biases for g in linears):
        if not all(g.biases for g in linears):
            raise Unprovable("fused projections with and without bias")
        bias = b.call(torch.cat, [_stack(b, g.biases, "bias") for g in linears], 1) if len(linears) > 1 \
            else _stack(b, linears[0].biases, "stacked_bias")
        out = b.call(operator.add, out, b.call(operator.getitem, bias, row_expert, name="row_bias"))
    return out


def _four_bit_stack(w: fx.Node):
    """(packed, absmax, shape, blocksize, quant_type) of the 4-bit layout's stack when `w` is its
    dequantized (E, out, in) weights, `dequantize_4bit(packed, absmax, ...).view(E, out, in)`; else None."""
    if not (w.op == "call_method" and w.target == "view" and len(w.args) == 4 and isinstance(w.args[0], fx.Node)):
        return None
    deq = w.args[0]
    # Known by name: torch.ops.bitsandbytes exists only once bitsandbytes is imported.
    packet = getattr(deq.target, "overloadpacket", deq.target)
    if getattr(packet, "_qualified_op_name", None) != "bitsandbytes::dequantize_4bit" or len(deq.args) != 6 \
            or deq.kwargs:
        return None
    packed, absmax, blocksize, quant_type, _, dtype = deq.args
    shape = example_value(w).shape
    if not (all(isinstance(s, int) for s in shape) and dtype == torch.bfloat16 and isinstance(blocksize, int)
            and isinstance(quant_type, str)):
        return None
    return packed, absmax, list(shape), blocksize, quant_type


_AUTOCAST_MATMULS = {"linear", "matmul", "mm", "__matmul__"}  # ops autocast runs in its lower precision


def _autocast_dtype(x: torch.Tensor, w: torch.Tensor, linears) -> torch.dtype | None:
    """bfloat16 when the loop is traced under torch.autocast to bfloat16 (PEFT's float32 adapters in a bf16 model,
    the HF Trainer's bf16=True) and these linears are ones autocast computes in bfloat16 but the rows or weights are
    not bfloat16 yet: emitting autocast's casts keeps them on torch._grouped_mm rather than the fallback op, with the
    numbers eager autocast gives. None otherwise."""
    device = x.device.type
    if (not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != torch.bfloat16
            or not all(op_name(g.node) in _AUTOCAST_MATMULS for g in linears)
            or not all(t.dtype in (torch.float32, torch.bfloat16) for t in (x, w))
            or (x.dtype == w.dtype == torch.bfloat16)):
        return None
    return torch.bfloat16


def _fits_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm under compile: bfloat16, and rows of whole 16-byte units (8 elements)."""
    return (x.dtype == w.dtype == torch.bfloat16
            and all(statically_known_true(s % 8 == 0) for s in (*w.shape[-2:], x.shape[-1])))


def _fusable_pairs(linears):
    """Two per-expert linears of one input (gate and up) become one grouped GEMM. When either reads slices stack[e] of
    one tensor (a weight layout, 3D experts, LoRA factors), _grouped_mm takes that stack as it is and fusing would
    copy both stacks every forward: done only for thin stacks (LoRA A factors: rank rows per expert, at most 1/8 of
    the input width), whose copy (17 MB at the Qwen3-30B-A3B shape, r=16) costs less than the second read of the
    input rows it saves (537 MB at 16384 tokens), and whose fused backward makes one input gradient, not two."""
    pairs = {}
    by_input: dict[fx.Node, list] = {}
    for g in linears:
        by_input.setdefault(_input_key(g.node.args[0]), []).append(g)
    for readers in by_input.values():
        sliced = [g for g in readers if all(slice_source(w) is not None for w in g.weights)]
        plain = [g for g in readers if g not in sliced]
        for group in (plain, [g for g in sliced if _copy_is_cheap(g)]):  # gate and up; or their LoRA A factors
            if (len(group) == 2 and bool(group[0].biases) == bool(group[1].biases)
                    and group[0].transposed == group[1].transposed):
                a, c = group
                pairs[a.node], pairs[c.node] = c, a
    return pairs


def _input_key(node):
    """What a linear reads, up to casts: the rows after no-op casts, or (those rows, dtype) for a real cast. PEFT casts
    each LoRA input to its adapter's dtype on its own (float32 by default: one cast node per adapter), and the factors
    reading equal casts of one tensor read equal rows."""
    node = _without_noop_casts(node)
    if isinstance(node, fx.Node) and op_name(node) in CASTS and isinstance(node.args[0], fx.Node):
        out = example_value(node)
        if isinstance(out, torch.Tensor):
            return _input_key(node.args[0]), out.dtype, out.device
    return node


def _without_noop_casts(node):
    """The tensor a chain of casts to its own dtype and device reads (PEFT casts each LoRA input to its adapter's dtype,
    a no-op for bf16 adapters: gate's and up's A factors then read the rows the base GEMM reads)."""
    while isinstance(node, fx.Node) and op_name(node) in CASTS and isinstance(node.args[0], fx.Node):
        out, src = example_value(node), example_value(node.args[0])
        if not (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor)
                and (out.dtype, out.device) == (src.dtype, src.device)):
            break
        node = node.args[0]
    return node


def _copy_is_cheap(g) -> bool:
    """A linear whose per-expert weight has at most 1/8 as many output rows as input columns (its stack is thin)."""
    w = example_value(g.weights[0])
    out_dim, in_dim = (w.shape[-2], w.shape[-1]) if g.transposed else (w.shape[-1], w.shape[-2])
    return statically_known_true(out_dim * 8 <= in_dim)


def _drop(graph: fx.Graph, nodes):
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted((n for n in nodes if n in order), key=order.__getitem__, reverse=True):
        graph.erase_node(n)


def _drop_unused(graph, nodes):
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n is None or n.users or op_name(n) not in ("permute", "one_hot"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        todo.extend(inputs)

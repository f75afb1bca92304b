"""Names and kinds of the torch-level ops that appear in Dynamo graphs of expert loops.

Dynamo graphs call torch functions (`torch._C._nn.linear`, `operator.mul`), and tensor methods
(`call_method` "reshape"). The pass only needs an op's name and which family it belongs to.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx


def op_name(node: fx.Node) -> str:
    """'reshape' for x.reshape(...), 'linear' for torch._C._nn.linear(...), '' for non-calls."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target.overloadpacket.__name__
        return getattr(node.target, "__name__", str(node.target))
    return ""


# Ops that compute each output element from the same element of their (broadcast) inputs.
ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "pos", "abs", "pow", "exp", "expm1", "log", "log1p",
    "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "relu6", "gelu", "silu", "elu", "selu", "celu",
    "leaky_relu", "softplus", "mish", "hardswish", "hardsigmoid", "hardtanh", "clamp", "clamp_min",
    "clamp_max", "clip", "minimum", "maximum", "sin", "cos", "erf", "reciprocal", "square",
    "to", "type", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach",
    "dropout", "alpha_dropout", "iadd", "isub", "imul", "itruediv", "floordiv", "mod", "rsub",
    "add_", "sub_", "mul_", "div_", "clamp_", "neg_", "sigmoid_", "tanh_", "relu_", "silu_",
}

# Ops that only change how each row is laid out (the row dimension stays outermost).
LAYOUT = {"reshape", "view", "flatten", "unflatten", "unsqueeze", "squeeze", "permute", "transpose"}

# Ops that work along a non-row dimension and keep rows apart.
# name -> (position of the dim argument, its default)
ALONG_DIM = {"softmax": (1, None), "log_softmax": (1, None), "glu": (1, -1), "chunk": (2, 0),
             "split": (2, 0), "narrow": (1, None), "cat": (1, 0), "normalize": (2, 1),
             # reductions (a hand-written RMSNorm's x.pow(2).mean(-1, keepdim=True)); no dim: over all, refused
             "mean": (1, None), "sum": (1, None), "amax": (1, None), "amin": (1, None), "var": (1, None),
             "std": (1, None), "logsumexp": (1, None)}

# Normalisations over the trailing `normalized_shape` dims.
NORMS = {"layer_norm", "rms_norm"}

LINEAR = {"linear"}

# x @ w with w (in, out): torch.matmul / operator.matmul (the @ operator) / torch.mm.
MATMUL = {"matmul", "mm"}

SIZE = {"size", "sym_size", "dim"}

ASSERTS = {"_assert_scalar", "_check_is_size", "_check", "ge", "le", "lt", "gt", "eq", "ne"}

INDEX_ADD = {"index_add_", "index_add"}

ZERO_FACTORIES = {"zeros", "zeros_like", "new_zeros"}

# Fresh (non-aliasing) tensors a loop may accumulate into.
FRESH = ZERO_FACTORIES | {"empty", "empty_like", "new_empty", "full", "full_like", "new_full", "clone",
                          "add", "sub", "mul", "truediv", "div"}



def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


# Dtype casts a body may apply to its expert's slice of a stack (`gate_up_proj[e].float()`): the cast of the whole
# stack, sliced, is the same value.
CASTS = {"float", "half", "bfloat16", "double", "to", "type"}


def slice_source(node):
    """(stack, e, cast) for a per-expert read `stack[e]` or `stack[e].float()` (cast: that node), else None."""
    cast = None
    if (isinstance(node, fx.Node) and op_name(node) in CASTS and node.args and isinstance(node.args[0], fx.Node)
            and not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values()))):
        cast, node = node, node.args[0]
    if (isinstance(node, fx.Node) and is_getitem(node) and isinstance(node.args[0], fx.Node)
            and isinstance(node.args[1], int) and isinstance(example_value(node.args[0]), torch.Tensor)):
        return node.args[0], node.args[1], cast
    return None


def cast_signature(cast):
    """What a cast node does, comparable across experts (None: no cast)."""
    return None if cast is None else (cast.op, cast.target, cast.args[1:], tuple(sorted(cast.kwargs.items())))


def example_value(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else node


def is_inplace(node: fx.Node) -> bool:
    """In-place ops other than the loop's own index_add_."""
    name = op_name(node)
    if node.op == "call_method":
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return name in {"iadd", "isub", "imul", "itruediv"}


def source_text(node: fx.Node) -> str | None:
    """Dynamo's source of a graph input, "L['self']._modules['experts']..._parameters['weight']", or None."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    return name() if callable(name) else name


def source_name(node: fx.Node) -> str:
    """'experts.0.up_proj.weight' for a Dynamo placeholder of L['self']._modules['experts']...['weight']."""
    text = source_text(node) or node.name
    text = re.sub(r"^L\[[^\]]*\](\[\d+\])?", "", text)
    words = re.findall(r"\['([^']+)'\]|\.(\w+)|\[(\d+)\]", text)
    parts = [w for group in words for w in group if w and w not in ("_modules", "_parameters", "_buffers", "__dict__")]
    return ".".join(parts) or node.name

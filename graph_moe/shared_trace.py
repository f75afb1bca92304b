"""Opt-in (`graph_moe.install(model, shared_block_trace=True)`): the MoE blocks of one kind traced once under a
whole-model torch.compile, through `torch.compiler.nested_compile_region`.

Compiled as one graph (`torch.compile(model, backend=graph_moe.backend)`, accelerate's whole-model dynamo plugin,
`graph_moe.inductor_options()`), a model makes Dynamo trace every layer's expert loop, body by body: about 6 s a
layer at 128 experts on a 2-core CPU. In a nested compile region, the installed forward is traced once per block kind
and input metadata, and every layer calls that one subgraph (an `invoke_subgraph` higher-order op, whose body the
pass rewrites). `graph_moe.compile` needs none of it (each decoder layer is its own graph, which identical layers
share, and expert 0's body is traced alone): in its regions the plain forward runs.

Opt-in: what it saves on the CPU (aot_eager, 4 layers 25.6 -> 12.0 s) it mostly does not save on a GPU with Inductor
(an H200, 4 Qwen3-30B-A3B-shaped layers with LoRA: first step 126 -> 104 s, graph_moe.compile 28 s;
docs/benchmarks.md, "Compile time").
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from graph_moe.families import common
from graph_moe.layout import is_4bit

# torch 2.11's Dynamo fails on a shared trace of 4-bit (bitsandbytes) experts with LoRA, comparing the
# invoke_subgraph bodies ("KeyError: example_value"); torch 2.13 takes it (2.12 untried).
TAKES_4BIT = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"


def can_share(block: torch.nn.Module) -> bool:
    """Whether this torch's Dynamo traces `block` as a shared region."""
    return TAKES_4BIT or not any(map(is_4bit, block.modules()))


@functools.cache  # one twin per family forward
def shared(forward: Callable) -> Callable:
    """`forward` (a family's traceable forward), traced as one nested compile region wherever Dynamo traces it outside
    graph_moe.compile's regions; called as it is otherwise (eager, or in those regions)."""
    region = torch.compiler.nested_compile_region(forward)

    @functools.wraps(forward)
    def twin(self, *args, **kwargs):
        if torch.compiler.is_compiling() and not common.IN_GRAPH_MOE_REGION:
            return region(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    twin.graph_moe_forward = forward
    return twin


def traceable(func) -> Callable | None:
    """The family forward behind an installed forward (itself, or the one its shared-trace twin calls)."""
    return getattr(func, "graph_moe_forward", func)

"""What keeps compiling an E-expert layer cheap: Dynamo traces the unrolled bodies without the fake-tensor cache and
without no-op casts; the inner compiler gets the cache back; trained experts' weights are stacked by one op."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import graph_moe
from graph_moe.kernels.stack_op import stack_weights
from helpers import Keep, assert_close_bf16, check_model_rewritten
from tiny_models import build


class CacheProbe(Keep):
    """Keeps each graph and what the fake-tensor cache did while Dynamo traced it, and whether it is on for the
    inner compiler (the backend, the fake mode AOTAutograd reuses)."""

    def __init__(self):
        super().__init__()
        self.traced_with_cache, self.inner_cache = [], []
        self.start = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses

    def __call__(self, gm, example_inputs, **kw):
        used = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses
        self.traced_with_cache.append(used > self.start)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self.inner_cache.append(fake_mode.cache_enabled and torch._dynamo.config.fake_tensor_cache_enabled)
        compiled = super().__call__(gm, example_inputs, **kw)
        self.start = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses
        return compiled


def test_dynamo_traces_without_the_fake_tensor_cache_and_the_inner_compiler_has_it():
    model = build("qwen3_moe", layers=1, experts=8).requires_grad_(False)
    probe = CacheProbe()
    graph_moe.compile(model, inner=probe)
    model(torch.randint(0, 64, (2, 7)), use_cache=False)
    assert probe.graphs and counters["graph_moe"]["loops_rewritten"] == 1
    assert probe.traced_with_cache == [False] * len(probe.graphs)  # no lookups while tracing the 8 bodies
    assert all(probe.inner_cache)
    assert torch._dynamo.config.fake_tensor_cache_enabled  # torch's default, outside the capture settings
    with graph_moe.capture_settings():
        assert not torch._dynamo.config.fake_tensor_cache_enabled


def test_the_inductor_pass_turns_the_cache_back_on_for_what_follows_it():
    """As a pre-grad pass under the plain inductor backend (graph_moe.inductor_options()), Dynamo traced without the
    cache too; AOTAutograd, after the pass, traces the small rewritten graph with it."""
    model = build("qwen3_moe", layers=1, experts=8).requires_grad_(False)
    graph_moe.install(model)
    block, seen = model.model.layers[0].mlp, []
    then = lambda graph: seen.append(torch._guards.detect_fake_mode().cache_enabled)  # noqa: E731
    hidden = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    with graph_moe.capture_settings():
        out = torch.compile(block, options=graph_moe.inductor_options(then=then))(hidden)[0]
    assert seen == [True] and counters["graph_moe"]["loops_rewritten"] == 1
    assert_close_bf16(out, block(hidden)[0], "output")


def test_the_range_loop_traces_no_noop_casts():
    """In a bf16 model every cast in the experts' bodies would be to the dtype a tensor has: none reaches the graph
    Dynamo traces (it would trace each one E times), and the block computes what it did in eager."""
    model = build("qwen3_moe", layers=1, experts=8).requires_grad_(False)
    graph_moe.install(model)
    block, graphs = model.model.layers[0].mlp, []
    hidden = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    with graph_moe.capture_settings():
        out = torch.compile(block, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward,
                            fullgraph=True)(hidden)[0]
    assert torch.equal(out, block(hidden)[0])
    nodes = [n for n in graphs[0].graph.nodes]
    casts = [n.format_node() for n in nodes if n.target == "to"]
    assert sum(n.target is torch.where for n in nodes) == 8  # the 8 unrolled bodies
    assert len(casts) == 1, casts  # the router's: softmax in fp32, routing weights back to bf16


def test_trained_experts_are_stacked_by_one_op_each():
    """Full fine-tuning without stacked parameters: each projection's E weights are stacked by graph_moe's op, not
    torch.stack (which Inductor lowers to one copy kernel per weight); logits and every gradient as in eager."""
    keep = check_model_rewritten(build("qwen3_moe", layers=1, experts=8), blocks=1)
    assert keep.count("stack_weights") == 3 and keep.count("stack") == 0  # gate, up, down
    assert counters["graph_moe"]["weight_stacks_per_forward"] == 3


def test_stack_weights_is_a_valid_custom_op():
    weights = [torch.randn(6, 4, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(stack_weights, (weights,))
    stacked = stack_weights(weights)
    assert torch.equal(stacked, torch.stack(weights))
    (stacked * torch.arange(3.0)[:, None, None]).sum().backward()
    assert all(torch.equal(w.grad, torch.full_like(w, e)) for e, w in enumerate(weights))


def test_the_routing_sort_has_int16_keys_and_a_short_one_is_padded_past_inductors_triton_sort():
    """The routing sort's keys are int16 (a radix sort makes a pass per key byte). Inductor compiles its own Triton
    sort for static sorts of at most 512 elements (seconds of compile on a GPU); the pass pads a short routing sort
    with sentinel ids to 513 so Inductor calls ATen's sort, and keeps the first rows: logits and gradients as in
    eager. Longer sorts are left as they are."""
    for seq_len, sorted_length in ((7, 513), (200, 2 * 200 * 2)):  # batch 2, top-2
        counters.clear()
        keep = check_model_rewritten(build("qwen3_moe", layers=1, experts=8), blocks=1, seq_len=seq_len)
        sorts = [n for g in keep.graphs for n in g.graph.nodes if n.target is torch.sort]
        keys = [n.args[0].meta["example_value"] for n in sorts]
        assert [(k.shape[0], k.dtype) for k in keys] == [(sorted_length, torch.int16)]

"""graph_moe.compile traces a loop of uniform experts with expert 0's body alone (passes/traced_once.py): the pass
groups that body over every expert, results equal eager; experts that are not uniform are traced body by body; a
loop traced once that the pass cannot rewrite is traced again with every body, never left computing expert 0."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters

import graph_moe
import graph_moe.passes as passes
from graph_moe.passes import prove_bodies
from helpers import loss_and_grads
from tiny_models import build

LORA = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"])


def frozen_experts(model):
    for name, param in model.named_parameters():
        param.requires_grad_("experts" not in name)
    return model


def assert_equals_eager(model, reference, lengths=(7, 12)):
    """Logits and every gradient of a training step, in float32 (where compiled and eager agree to rounding)."""
    for length in lengths:
        ids = torch.randint(0, 64, (2, length))
        (logits, grads), (ref_logits, ref_grads) = loss_and_grads(model, ids), loss_and_grads(reference, ids)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert ref_grads and ref_grads.keys() <= grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_frozen_experts_traced_once_equal_eager(family, traced):
    model = frozen_experts(build(family, experts=8, dtype=torch.float32, seed=torch.seed() % 1000))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert_equals_eager(model, reference)
    assert traced and set(traced) == {(1, True)}  # one body per loop, marked
    snapshot = graph_moe.counter_snapshot()
    assert snapshot["loops_rewritten"] == snapshot["loops_traced_once"] == len(traced)
    assert snapshot["weight_stacks_per_forward"] == 0


def test_off_traces_every_body(traced):
    model = frozen_experts(build("qwen3_moe", experts=8, dtype=torch.float32))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager", trace_experts_once=False)
    assert_equals_eager(model, reference, lengths=(9,))
    assert traced and set(traced) == {(8, False)} and graph_moe.counter_snapshot()["loops_traced_once"] == 0


def test_lora_on_stacked_adapters_traced_once_equal_eager(traced):
    model = get_peft_model(frozen_experts(build("qwen3_moe", experts=8, dtype=torch.float32)), copy.deepcopy(LORA))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert_equals_eager(model, reference)
    assert set(traced) == {(1, True)}


def test_4bit_experts_traced_once_equal_bitsandbytes(tmp_path, traced):
    """QLoRA: NF4 experts (blocks whole, as the CPU layout needs) with LoRA on them, against bitsandbytes and PEFT."""
    import transformers as tf

    from graph_moe.tools.model_zoo import build_model
    from graph_moe.stacked_adapters import split_stacked
    from helpers import assert_close_bf16, assert_grads_close

    build_model("qwen3_moe", layers=2, experts=4, hidden=64, intermediate=128, vocab=64, seed=1).save_pretrained(tmp_path)
    quant = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)

    def qlora():
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": "cpu"})
        torch.manual_seed(0)  # the same adapters in both
        return get_peft_model(model.train(), copy.deepcopy(LORA))
    model, reference = qlora(), qlora()
    graph_moe.compile(model, inner="aot_eager")
    ids = torch.randint(0, 64, (2, 9))
    (logits, grads), (ref_logits, ref_grads) = loss_and_grads(model, ids), loss_and_grads(reference, ids)
    assert_close_bf16(logits, ref_logits, "logits")
    lora = lambda g: split_stacked({n: v for n, v in g.items() if "lora_" in n})  # noqa: E731
    assert_grads_close(lora(grads), lora(ref_grads))
    assert set(traced) == {(1, True)}


@pytest.mark.parametrize("difference", ["adapters_on_some_experts", "one_experts_scaling", "trained_experts"])
def test_experts_that_differ_are_traced_body_by_body(difference, traced):
    """Adapters on experts 0-3 only, one expert's LoRA scaling changed, or trained experts (no layout): the bodies
    are not expert 0's with another row, so each is traced and proven."""
    model = build("qwen3_moe", experts=8, dtype=torch.float32)
    if difference != "trained_experts":
        frozen_experts(model)
    if difference == "adapters_on_some_experts":
        config = copy.deepcopy(LORA)
        config.target_modules = r".*experts\.[0-3]\.(gate|up|down)_proj"
        model = get_peft_model(model, config)
    elif difference == "one_experts_scaling":
        model = get_peft_model(model, copy.deepcopy(LORA))
        for layer in model.base_model.model.model.layers:
            layer.mlp.experts[5].up_proj.scaling["default"] = 0.5
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert_equals_eager(model, reference, lengths=(9,))
    assert traced and all(steps == 8 and not marked for steps, marked in traced)


def test_a_loop_traced_once_that_cannot_be_rewritten_is_traced_again(traced, monkeypatch, caplog):
    """The pass failing on expert 0's body (here: made to) must not leave a graph that computes expert 0 alone: the
    region is traced again with every body, which the pass then rewrites (or leaves as traced, correct)."""
    prove = prove_bodies.prove

    def failing_once(cand):
        if cand.marker is not None:
            raise prove_bodies.Unprovable("made to fail by the test")
        return prove(cand)
    monkeypatch.setattr(passes, "prove", failing_once)
    model = frozen_experts(build("qwen3_moe", experts=8, dtype=torch.float32))
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="graph_moe"):
        graph_moe.compile(model, inner="aot_eager")
        assert_equals_eager(model, reference, lengths=(9, 5))
    assert "made to fail by the test" in caplog.text and "tracing every expert's body instead" in caplog.text
    assert traced[0] == (1, True) and set(traced[1:]) == {(8, False)}  # the first try, then every body
    assert counters["graph_moe"]["loops_rewritten"] == len(traced) - 1


def test_the_marker_never_computes_expert_0_alone():
    """Run without the rewrite (another compiler, eager), the marker raises rather than return expert 0's rows."""
    rows = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="expert 0's body only"):
        torch.ops.graph_moe.every_expert_as_expert_0(rows, 4, [torch.randn(4, 8, 8)])


@pytest.mark.parametrize("adapters", [False, True], ids=["frozen", "lora"])
def test_the_rewrite_of_one_body_is_the_rewrite_of_every_body(adapters):
    """The graph Inductor gets is the same either way: the same ops, in the same numbers (names aside)."""
    from collections import Counter

    from helpers import Keep

    def ops(trace_experts_once):
        model = frozen_experts(build("qwen3_moe", experts=8))
        model = get_peft_model(model, copy.deepcopy(LORA)) if adapters else model
        keep = Keep()
        graph_moe.compile(model, inner=keep, trace_experts_once=trace_experts_once)
        loss_and_grads(model, torch.randint(0, 64, (2, 9)))
        return [Counter(str(n.target) for n in g.graph.nodes if n.op in ("call_function", "call_method"))
                for g in keep.graphs]

    once, every = ops(True), ops(False)
    assert once and len(once) == len(every)
    for a, b in zip(once, every):
        assert a == b, (a - b, b - a)


def test_trained_experts_stacked_traced_once_equal_eager(traced):
    """stack_experts=True: trained experts as two stacked parameters, whose gradients reach every expert's rows."""
    model = build("qwen3_moe", experts=8, dtype=torch.float32)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager", stack_experts=True)
    assert_equals_eager(model, reference)
    assert set(traced) == {(1, True)}


class _ListsSomeStacks:
    """Mixed into test_families_stacked.StackedMoE: the loop is told of the stacks `listed` only."""

    listed = ()

    def forward(self, hidden_states):
        from graph_moe.families.stacked import stacked_expert_loop

        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        routing_weights = torch.nn.functional.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        stacks = [getattr(self, name) for name in self.listed]
        out = stacked_expert_loop(hidden_states, routing_weights.to(hidden_states.dtype), selected, self.num_experts,
                                  self.expert, stacks)
        return out.reshape(shape)


@pytest.mark.parametrize("listed,once", [
    (("w_gate", "b_gate", "w_up", "b_up", "down", "down_bias", "scale"), True),
    (("w_gate", "b_gate", "w_up", "b_up", "down", "scale"), False),  # down_bias[e] not listed
    (("w_gate", "b_gate", "w_up", "b_up", "down", "down_bias"), False),  # scale[e] not listed
])
def test_a_per_expert_read_the_loop_does_not_list_is_traced_again(listed, once, traced, caplog):
    """Expert 0's body reading row 0 of a tensor the marker does not list: read as shared, every expert would use
    expert 0's row. The pass refuses it, and the region is traced again with every body."""
    from graph_moe.compile import compile_regions
    from test_families_stacked import StackedMoE

    block_class = type("Block", (_ListsSomeStacks, StackedMoE), {"listed": listed})
    torch.manual_seed(0)
    block = block_class(form="matmul", bias=True, fused=False, scale=True)
    x = torch.randn(2, 5, 16)
    expected = block(x)
    with caplog.at_level(logging.WARNING, logger="graph_moe"):
        compile_regions([block], graph_moe.make_backend("aot_eager"), trace_once=True)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert traced[0] == (1, True) and counters["graph_moe"]["loops_rewritten"] == 1
    if once:
        assert len(traced) == 1 and "tracing every expert" not in caplog.text
    else:
        assert "not row 0 of a stack the marker lists" in caplog.text and traced[1:] == [(4, False)]


def test_another_compile_around_graph_moe_compile_traces_every_body():
    """torch.compile(model) over a model graph_moe.compile compiled: whatever the outer trace sees, its backend is not
    graph_moe's, so no loop traced once may reach it; results equal eager."""
    model = frozen_experts(build("qwen3_moe", experts=8, dtype=torch.float32))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    outer = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(outer(ids, use_cache=False).logits, reference(ids, use_cache=False).logits,
                               atol=1e-4, rtol=1e-4)


def test_lora_added_after_compile_is_seen(traced, caplog):
    """PEFT wraps the expert projections of a model graph_moe.compile already compiled (install not run again, so
    the adapters are each expert's own): the layout notes it and the loop is traced body by body; equal eager."""
    model = frozen_experts(build("qwen3_moe", experts=8, dtype=torch.float32))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    assert_equals_eager(model, reference, lengths=(6,))
    torch.manual_seed(1)
    model = get_peft_model(model, copy.deepcopy(LORA))
    torch.manual_seed(1)
    reference = get_peft_model(reference, copy.deepcopy(LORA))
    with caplog.at_level(logging.WARNING, logger="graph_moe"):
        assert_equals_eager(model, reference, lengths=(9,))
    assert traced[0] == (1, True) and traced[-1] == (8, False)
    assert "tracing every expert" not in caplog.text  # known before tracing, not found by the pass


def test_a_stale_uniform_flag_is_caught_by_the_pass(traced, caplog):
    """Should the layout wrongly call experts with adapters of their own uniform, expert 0's body reads expert 0's
    adapter weights, graph inputs the pass will not read as shared: traced again with every body, equal eager."""
    model = get_peft_model(frozen_experts(build("qwen3_moe", experts=8, dtype=torch.float32)), copy.deepcopy(LORA))
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    from graph_moe.stacked_adapters import unstack_adapters

    for layer in model.base_model.model.model.layers:
        unstack_adapters(layer.mlp)  # each expert's own adapters again
        layer.mlp.__dict__["_graph_moe_layout"].adapters = None
        layer.mlp.__dict__["_graph_moe_layout"].no_adapters = True  # the stale flag
    with caplog.at_level(logging.WARNING, logger="graph_moe"):
        assert_equals_eager(model, reference, lengths=(9,))
    assert "a module's parameter or buffer" in caplog.text
    assert traced[0] == (1, True) and traced[-1] == (8, False)


def test_rows_read_through_a_cast_are_traced_once(traced):
    """Expert 0's body reading `stack[0].float()` (the privacy-filter form): each expert's row cast alike, the whole
    stack cast once in the grouped graph; equal eager."""
    from graph_moe.compile import compile_regions
    from test_families_stacked import StackedMoE

    class CastRows(_ListsSomeStacks, StackedMoE):
        listed = ("gate_up", "down")

        def expert(self, e, x):
            gate, up = (x @ self.gate_up[e].float()).chunk(2, dim=-1)
            return (torch.nn.functional.silu(gate) * up) @ self.down[e].float()

    torch.manual_seed(0)
    block = CastRows(form="matmul", bias=False, fused=True)
    x = torch.randn(2, 5, 16)
    expected = block(x)
    compile_regions([block], graph_moe.make_backend("aot_eager"), trace_once=True)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert traced == [(1, True)] and counters["graph_moe"]["loops_rewritten"] == 1
    assert graph_moe.counter_snapshot()["weight_stacks_per_forward"] == 0  # the stack cast whole, not copied row by row

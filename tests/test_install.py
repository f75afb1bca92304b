"""The installer: traceable forwards are exact, reversible, idempotent, PEFT-safe, and capture in one Dynamo graph."""

import copy
import logging
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import (
    FlexOlmoConfig,
    MiniMaxConfig,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock
from transformers.models.minimax.modeling_minimax import MiniMaxSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from graph_moe.install import install, uninstall
from moe_blocks import RangeMoE

VOCAB = 64
NUM_LAYERS = 2
NUM_EXPERTS = 4
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    initializer_range=0.2,  # large enough that routing and outputs vary across tokens
)


def mixtral():
    return MixtralForCausalLM(MixtralConfig(num_local_experts=NUM_EXPERTS, router_jitter_noise=0.0, **COMMON))


def qwen2_moe():
    cfg = Qwen2MoeConfig(
        num_experts=NUM_EXPERTS, moe_intermediate_size=32, shared_expert_intermediate_size=48, **COMMON
    )
    return Qwen2MoeForCausalLM(cfg)


def qwen3_moe(norm_topk_prob=True):
    cfg = Qwen3MoeConfig(
        num_experts=NUM_EXPERTS, moe_intermediate_size=32, head_dim=8, norm_topk_prob=norm_topk_prob, **COMMON
    )
    return Qwen3MoeForCausalLM(cfg)


def olmoe():
    return OlmoeForCausalLM(OlmoeConfig(num_experts=NUM_EXPERTS, **COMMON))


MODELS = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe_norm": lambda: qwen3_moe(True),
    "qwen3_moe_no_norm": lambda: qwen3_moe(False),
    "olmoe": olmoe,
}


def build(name):
    torch.manual_seed(0)
    return MODELS[name]()


def input_ids(seed=1, batch=2, seq=8):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


def assert_exact(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def grads(model):
    # The expert_hit loop never calls an expert no token chose (grad None); the range loop calls it on zero
    # tokens (grad zeros). Compare them as equal.
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_eager(name):
    model = build(name).eval()
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        report = install(model)
        out = model(ids).logits
    assert report.num_installed == NUM_LAYERS
    assert all(b.status == "installed" for b in report.blocks)
    assert_exact(out, ref)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe_norm", "olmoe"])
def test_train_mode_forward_and_backward_match(name):
    model = build(name).train()
    ids = input_ids(seed=2)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), grads(model)

    ref_logits, ref_loss, ref_grads = step()
    install(model)
    logits, loss, got_grads = step()
    assert_exact(logits, ref_logits)
    assert_exact(loss, ref_loss)
    assert got_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-6, rtol=0, msg=n)


def test_mixtral_jitter_draws_the_same_noise():
    """With jitter on, the same RNG state must give the same noise, hence the same output and routing."""
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=64, router_jitter_noise=0.1)).train()
    x = torch.randn(2, 8, 32)

    def run():
        torch.manual_seed(3)
        return block(x.clone())  # the jitter scales its input in place, as in transformers

    ref_out, ref_logits = run()
    install(block)
    out, logits = run()
    assert torch.equal(out, ref_out) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize(
    "block_cls, config",
    [
        (MiniMaxSparseMoeBlock, MiniMaxConfig(hidden_size=32, intermediate_size=64, num_local_experts=8)),
        (FlexOlmoSparseMoeBlock, FlexOlmoConfig(hidden_size=32, intermediate_size=64, num_experts=8)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_blocks_bitwise_equal(block_cls, config, dtype):
    torch.manual_seed(0)
    block = block_cls(config).to(dtype).eval()
    x = torch.randn(2, 8, 32, dtype=dtype)
    ref_out, ref_logits = block(x)
    report = install(block)
    out, logits = block(x)
    assert report.num_installed == 1 and report.blocks[0].path == ""
    assert torch.equal(out, ref_out) and torch.equal(logits, ref_logits)


def test_uninstall_restores_class_forward():
    model = build("qwen2_moe")
    install(model)
    blocks = moe_blocks(model)
    assert all("forward" in b.__dict__ and b._graph_moe_installed == "H" for b in blocks)
    assert uninstall(model) == NUM_LAYERS
    assert all("forward" not in b.__dict__ and not hasattr(b, "_graph_moe_installed") for b in blocks)
    assert all(b.forward.__func__ is type(b).forward for b in blocks)
    assert uninstall(model) == 0


def test_install_twice_changes_nothing():
    model = build("olmoe")
    install(model)
    forwards = [b.forward for b in moe_blocks(model)]
    report = install(model)
    assert report.num_installed == 0
    assert [b.status for b in report.blocks] == ["already installed"] * NUM_LAYERS
    assert all(b.__dict__["forward"] is f for b, f in zip(moe_blocks(model), forwards))


def test_state_dict_unchanged():
    model = build("mixtral")
    before = model.state_dict()
    install(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)


def test_report_table_and_log(caplog):
    model = build("qwen3_moe_norm")
    with caplog.at_level(logging.INFO, logger="graph_moe"):
        report = install(model)
    text = str(report)
    assert "model.layers.1.mlp" in text and "Qwen3MoeSparseMoeBlock" in text and "installed" in text
    assert [r.message for r in caplog.records] == [
        "graph_moe: installed 2 MoE block(s), 0 already installed, 0 not supported"
    ]


def test_filter_fn_selects_blocks():
    model = build("qwen3_moe_norm")
    report = install(model, filter_fn=lambda path, block: path.startswith("model.layers.0."))
    assert [b.path for b in report.blocks] == ["model.layers.0.mlp"]
    assert ["forward" in b.__dict__ for b in moe_blocks(model)] == [True, False]


def test_unsupported_blocks_are_reported_and_left_alone():
    torch.manual_seed(0)
    unknown = RangeMoE()  # experts in a ModuleList, but a class graph_moe has no forward for
    report = install(unknown)
    assert report.blocks[0].status == "not supported: no traceable forward for RangeMoE"
    assert "forward" not in unknown.__dict__

    model = build("olmoe")
    odd, hooked = moe_blocks(model)
    odd.num_experts = NUM_EXPERTS + 1  # a same-named class with a different layout
    hooked.forward = types.MethodType(lambda self, x: x, hooked)  # someone else's instance forward
    foreign = hooked.forward
    statuses = [b.status for b in install(model).blocks]
    assert statuses[0].startswith("not supported: num_experts=5")
    assert statuses[1] == "not supported: forward already replaced on the instance"
    assert "forward" not in odd.__dict__ and hooked.forward is foreign
    assert uninstall(model) == 0 and hooked.forward is foreign


def test_deepcopy_rebinds_forward():
    model = build("mixtral")
    install(model)
    clone = copy.deepcopy(model)
    for b in moe_blocks(clone):
        assert b.forward.__self__ is b
    ids = input_ids()
    with torch.no_grad():
        assert_exact(clone(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name, targets", [("qwen2_moe", ["gate_proj", "up_proj", "down_proj"]), ("mixtral", ["w1", "w2", "w3"])])
def test_install_after_peft(name, targets):
    model = build(name)
    torch.manual_seed(1)
    # init_lora_weights=False: random B, so LoRA changes the output and the test sees it.
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=4, init_lora_weights=False)).eval()
    expert = moe_blocks(peft_model)[0].experts[0]
    assert type(getattr(expert, targets[0])).__name__ == "Linear" and hasattr(getattr(expert, targets[0]), "lora_A")
    ids = input_ids()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        report = install(peft_model)
        out = peft_model(input_ids=ids).logits
    assert report.num_installed == NUM_LAYERS
    assert all(".model.model.layers." in b.path for b in report.blocks)
    assert_exact(out, ref)


def capture(model, ids):
    """Compile with a backend that only records the graphs Dynamo hands it; return (graphs, output)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        with torch.no_grad():
            out = torch.compile(model, backend=recording_backend)(ids, use_cache=False).logits
    return graphs, out


def count_index_add(graphs):
    return sum(n.op == "call_method" and n.target == "index_add_" for g in graphs for n in g.graph.nodes)


def test_dynamo_captures_whole_model_in_one_graph():
    model = build("qwen3_moe_norm").eval()
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
    try:
        # Stock 4.57 forward: the expert_hit loop breaks the graph. On torch 2.13 that break is recorded under
        # "unimplemented" (the frame is skipped), not under "graph_break".
        graphs, out = capture(model, ids)
        assert counters["graph_break"] or counters["unimplemented"]
        assert len(graphs) > 1 and count_index_add(graphs) == 0
        assert_exact(out, ref)

        install(model)
        graphs, out = capture(model, ids)
        assert not counters["graph_break"] and not counters["unimplemented"]
        assert len(graphs) == 1
        assert count_index_add(graphs) == NUM_LAYERS * NUM_EXPERTS
        assert_exact(out, ref)
    finally:
        torch._dynamo.reset()
        counters.clear()


def test_class_forward_bound_on_the_instance_is_not_a_replacement():
    """Libraries that restore a block (unsloth-zoo's disable_grouped_moe) may leave `block.forward = <the class
    forward, bound>`; install shadows it, and a truly foreign forward is still refused."""
    import types

    model = build("qwen3_moe_norm")
    block = moe_blocks(model)[0]
    block.forward = types.MethodType(type(block).forward, block)
    assert install(model).blocks[0].status == "installed"
    uninstall(model)
    block.forward = lambda hidden_states: (hidden_states, None)
    assert "forward already replaced" in install(model).blocks[0].status

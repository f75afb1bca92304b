"""transformers 5.x experts modules (3D gate_up_proj / down_proj) as users load them (experts_implementation
"grouped_mm", the default) and with the other implementations transformers ships: install puts the traceable forward
on each experts instance, the pass groups the 3D parameters as they are (no copy), and logits and every gradient
equal the untouched model's."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
import transformers  # noqa: E402
from packaging import version  # noqa: E402
from torch import nn  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402

import graph_moe  # noqa: E402
from graph_moe.families import unsupported_reason  # noqa: E402
from helpers import check_model_rewritten  # noqa: E402
from tiny_models import FAMILIES, build  # noqa: E402

EXPERTS = {"mixtral": "MixtralExperts", "qwen2_moe": "Qwen2MoeExperts", "qwen3_moe": "Qwen3MoeExperts",
           "olmoe": "OlmoeExperts"}


def _weights_read_without_copy(keep) -> int:
    """Grouped GEMMs whose weight is a graph input (the 3D parameter itself) seen through a transpose."""
    found = 0
    for graph in keep.graphs:
        for node in graph.graph.nodes:
            if getattr(node.target, "__name__", None) in ("_grouped_mm", "grouped_mm"):
                weight = node.args[1]
                found += weight.target == "transpose" and weight.args[0].op == "placeholder"
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_as_loaded_rewritten_and_equal(family):
    """The model as from_config / from_pretrained make it: no experts_implementation asked for."""
    model = build(family)
    assert model.config._experts_implementation == "grouped_mm"
    keep = check_model_rewritten(model, blocks=2)
    report = model._graph_moe_install_report
    # One line per layer, the experts module's: the 5.x block around it delegates to it; it names what it replaced.
    assert [(b.class_name, b.form) for b in report.blocks] == [(EXPERTS[family], "grouped_mm")] * 2, str(report)
    assert all("took over experts_implementation='grouped_mm'" in b.weights for b in report.blocks), str(report)
    assert _weights_read_without_copy(keep) == 2  # gate_up_proj and down_proj, as they are


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_other_implementations_rewritten_and_equal(implementation):
    model = build("qwen3_moe", experts_implementation=implementation)
    check_model_rewritten(model, blocks=2)
    assert [b.form for b in model._graph_moe_install_report.blocks] == [implementation] * 2


def _other_family(name):
    """5.x models whose experts class shares the standard eager loop while their routing differs (DeepSeek-V3:
    sigmoid, grouped top-k, fp32 weights; PhiMoE: sparsemixer; Jamba: hybrid Mamba layers, attention-only here)."""
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if name == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8)
    elif name == "phimoe":
        config = transformers.PhimoeConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        config = transformers.JambaConfig(**common, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
                                          expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0,
                                          use_mamba_kernels=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


@pytest.mark.parametrize("family", ["deepseek_v3", "phimoe", "jamba"])
def test_other_families_share_the_experts_forward(family):
    model = _other_family(family)
    check_model_rewritten(model, blocks=2)


def test_keep_transformers_grouped_leaves_them():
    """The opt-out: transformers' own grouped forward kept, and the report says so; "eager" is still taken over."""
    model = build("qwen3_moe", layers=1)
    report = graph_moe.install(model, keep_transformers_grouped=True)
    assert report.num_installed == 0 and len(report.blocks) == 1
    assert "keep_transformers_grouped" in report.blocks[0].status, str(report)
    assert not any("forward" in m.__dict__ for m in model.modules())
    eager = build("qwen3_moe", layers=1, experts_implementation="eager")
    assert graph_moe.install(eager, keep_transformers_grouped=True).num_installed == 1


def test_an_implementation_registered_elsewhere_is_refused_by_name():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

    ALL_EXPERTS_FUNCTIONS.register("someone_elses", grouped_mm_experts_forward)
    model = build("qwen3_moe", layers=1)
    try:
        model.set_experts_implementation("someone_elses")
    except ValueError:  # early 5.x releases accept only their own names there: the config holds it all the same
        model.config._experts_implementation = "someone_elses"
    report = graph_moe.install(model)
    assert report.num_installed == 0 and "'someone_elses'" in report.blocks[0].status, str(report)


def test_uninstall_restores_the_class_forward():
    model = build("mixtral", layers=1, experts_implementation="eager")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert graph_moe.install(model).num_installed == 1
        installed = model(input_ids=ids).logits  # the traceable forward, run eagerly
        assert graph_moe.uninstall(model) == 1
        after = model(input_ids=ids).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(installed, before, rtol=0, atol=0)  # same terms, same order: bit-identical
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_other_eager_loops_are_refused():
    """An experts class whose eager forward is not a loop the derivation can make exact is refused, not guessed at."""
    config = build("mixtral", layers=1, experts_implementation="eager").config

    @use_experts_implementation
    class MixtralExperts(modeling_mixtral.MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states, top_k_index, top_k_weights) * 2

    assert "cannot become a range loop" in unsupported_reason(MixtralExperts(config))
    assert unsupported_reason(modeling_mixtral.MixtralExperts(config)) is None
    parallel = modeling_mixtral.MixtralExperts(config)
    parallel._is_expert_parallel = True
    assert "expert parallelism" in unsupported_reason(parallel)
    assert isinstance(parallel.gate_up_proj, nn.Parameter)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_checkpointed_layers_rewritten_and_equal(family):
    """Gradient checkpointing: transformers 5 runs each decoder layer under torch.utils.checkpoint, which Dynamo
    traces as a higher-order op whose body (a submodule of the graph) holds the expert loop. Regression:
    the pass once read only the graph itself, found no loop, and said nothing; it now rewrites the body too."""
    model = build(family, experts_implementation="eager", dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep = check_model_rewritten(model, blocks=2)
    # transformers 5.24 and later run the checkpointed layer as a higher-order op (its body a submodule); earlier 5.x
    # releases trace it inline
    if version.parse(transformers.__version__) >= version.parse("5.24"):
        assert any(name.startswith("wrap_body") for graph in keep.graphs for name, _ in graph.named_children())


def _replaced_forward(self, hidden_states, top_k_index, top_k_weights):
    return hidden_states  # stands for another library's experts forward (Unsloth's grouped Triton GEMMs)


def test_experts_whose_class_forward_another_library_replaced_are_refused_by_name():
    """Unsloth on 5.x patches Qwen3MoeExperts.forward on the class (and keeps the block out of torch.compile): the
    experts module's report line says so, and graph_moe leaves the forward as it is."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    model = build("qwen3_moe", layers=1)
    # the class stays transformers' (its module), its forward comes from elsewhere: as Unsloth's patch_function leaves it
    patched = type("Qwen3MoeExperts", (modeling_qwen3_moe.Qwen3MoeExperts,),
                   {"forward": _replaced_forward, "__module__": modeling_qwen3_moe.__name__})
    experts = model.model.layers[0].mlp.experts
    experts.__class__ = patched
    report = graph_moe.install(model)
    (entry,) = report.blocks
    assert entry.class_name == "Qwen3MoeExperts" and report.num_installed == 0, str(report)
    assert "replaced on the class by" in entry.status and "_replaced_forward" in entry.status, str(report)
    assert "forward" not in experts.__dict__

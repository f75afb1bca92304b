"""transformers 5.x experts classes whose eager loop is not one of the two standard ones (Aria, gpt-oss, the OpenAI
privacy filter, Inkling2, Inkling2Loop, MuseSpark, NemotronH): install derives a range loop from each class's own
forward (graph_moe/families/transformers5_generic.py). Tiny models of the real classes, bf16, 4 experts, top-2:
- the derived forward equals the class's eager forward bit for bit (outputs and gradients), also when an expert
  gets no tokens;
- install + compile rewrites every MoE loop the pass can prove, and reports why it leaves the others; logits and
  every gradient equal untouched eager either way;
- a look-alike whose loop differs (an extra effect in the body, another hit set, ...) is refused with the reason.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402

import graph_moe  # noqa: E402
from graph_moe.compile import compile_regions  # noqa: E402
from graph_moe.families import transformers5_generic, unsupported_reason  # noqa: E402
from helpers import Recorder, assert_close_bf16, assert_grads_close  # noqa: E402

_SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              experts_implementation="eager")
_INKLING = dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, moe_intermediate_size=32,
                n_routed_experts=4, num_experts_per_tok=2, unpadded_vocab_size=64, n_layers_per_attn_res_block=1,
                sliding_window_size=8, rel_extent=8, d_rel=4, eos_token_id=1)


_CONFIG_CLASSES = {"aria": "AriaTextConfig", "gpt_oss": "GptOssConfig", "openai_privacy_filter": "OpenAIPrivacyFilterConfig",
                   "inkling2": "Inkling2TextConfig", "inkling2_loop": "Inkling2LoopTextConfig",
                   "muse_spark": "MuseSparkTextConfig", "nemotron_h": "NemotronHConfig"}


def _build(family: str):
    """A tiny bf16 model of `family` (its MoE layers the real 5.x classes): whole causal LMs where that is practical
    on the CPU; Aria's text model (no vision tower), MuseSpark's text model, NemotronH with attention and MoE layers
    only (no mamba), the privacy filter's token classifier (its only head)."""
    config_class = _CONFIG_CLASSES[family]
    if not hasattr(transformers, config_class):  # a class newer than the installed release (run-releases --sweep)
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    torch.manual_seed(0)
    if family == "aria":
        config = transformers.AriaTextConfig(**_SMALL, intermediate_size=32, num_hidden_layers=2, moe_num_experts=4,
                                             moe_topk=2, moe_num_shared_experts=1)
        return transformers.AriaTextForCausalLM(config).to(torch.bfloat16)
    if family == "gpt_oss":
        config = transformers.GptOssConfig(**_SMALL, intermediate_size=32, num_hidden_layers=2, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=8)
        return transformers.GptOssForCausalLM(config).to(torch.bfloat16)
    if family == "openai_privacy_filter":
        config = transformers.OpenAIPrivacyFilterConfig(
            **_SMALL, intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=8, num_labels=5, pad_token_id=0, eos_token_id=0)
        return transformers.OpenAIPrivacyFilterForTokenClassification(config).to(torch.bfloat16)
    if family == "inkling2":  # routers keep fp32 weights (_keep_in_fp32_modules_strict): built in bf16 by from_config
        config = transformers.Inkling2TextConfig(**_SMALL, **_INKLING, num_hidden_layers=1)
        return transformers.Inkling2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    if family == "inkling2_loop":
        config = transformers.Inkling2LoopTextConfig(**_SMALL, **_INKLING, num_hidden_layers=2,
                                                     loop_layer_index_start=1, loop_layer_index_end=2,
                                                     loop_num_passes=1, loop_gate_rank=4)
        return transformers.Inkling2LoopForCausalLM._from_config(config, dtype=torch.bfloat16)
    if family == "muse_spark":
        config = transformers.MuseSparkTextConfig(**_SMALL, intermediate_size=32, num_hidden_layers=1,
                                                  num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                  moe_hidden_size=32, sliding_window=8, eos_token_id=1, bos_token_id=0)
        return transformers.MuseSparkTextModel(config).to(torch.bfloat16)
    assert family == "nemotron_h"
    config = transformers.NemotronHConfig(**_SMALL, intermediate_size=32, layers_block_type=["attention", "moe"] * 2,
                                          n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          moe_shared_expert_intermediate_size=32, use_mamba_kernels=False)
    return transformers.NemotronHForCausalLM(config).to(torch.bfloat16)


# family -> (experts class, MoE layers, the reason the pass leaves the loop as traced, or None: rewritten)
FAMILIES = {
    "aria": ("AriaExperts", 2, None),
    "gpt_oss": ("GptOssExperts", 2, None),
    # gate_up_proj[e].float(): each expert's slice cast to fp32, grouped as the whole stack cast once; fp32 GEMMs
    # take graph_moe's fallback grouped op (torch._grouped_mm compiles in bf16 only).
    "openai_privacy_filter": ("OpenAIPrivacyFilterExperts", 2, None),
    "inkling2": ("Inkling2Experts", 1, None),
    "inkling2_loop": ("Inkling2LoopExperts", 2, None),
    # post_expert_norm computes (1.0 + weight).float() once per expert, outside the rows: a new node in each body,
    # the same pure computation on the same weight, which the prover takes as one value.
    "muse_spark": ("MuseSparkExperts", 1, None),
    "nemotron_h": ("NemotronHExperts", 2, None),
}


def _loss(model, ids):
    """(output, loss) for each head: the LM loss, the token-classification loss, or a square loss on the states."""
    if isinstance(model, getattr(transformers, "MuseSparkTextModel", ())):  # () where the release has no such class
        out = model(input_ids=ids, use_cache=False).last_hidden_state
        return out, out.float().pow(2).mean()
    if isinstance(model, getattr(transformers, "OpenAIPrivacyFilterForTokenClassification", ())):
        out = model(input_ids=ids, labels=ids % model.config.num_labels)
    else:
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.logits, out.loss


def _output_and_grads(model, ids):
    model.zero_grad()
    out, loss = _loss(model, ids)
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _experts(model, class_name):
    return [m for m in model.modules() if type(m).__name__ == class_name]


def _logits_and_experts_arguments(model, experts):
    """The model's output on fixed tokens, and the (hidden_states, indices, weights) it passes `experts` (their
    shapes and dtypes: the routing weights are fp32 from most of these routers, bf16 from Aria's and gpt-oss's)."""
    seen = []
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad():
        out = _loss(model, torch.arange(14).reshape(2, 7))[0]
    handle.remove()
    return out, seen[0]


def _routing(arguments, num_experts, *, skip=None, seed=0):
    """Fresh arguments like `arguments`: random states and weights, top-k distinct experts per token, never `skip`."""
    hidden, ids, weights = arguments
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e != skip])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:ids.shape[1]]] for _ in range(len(ids))])
    return (torch.randn(hidden.shape, generator=g).to(hidden.dtype).requires_grad_(), ids,
            torch.rand(weights.shape, generator=g).to(weights.dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_derived_range_loop_equals_eager_bit_for_bit(family):
    class_name, layers, _ = FAMILIES[family]
    model = _build(family)
    experts = _experts(model, class_name)[0]
    assert unsupported_reason(experts) is None
    original = type(experts).forward.__wrapped__
    assert callable(transformers5_generic.derive_range_forward(original))
    derived = transformers5_generic.generic_experts_forward  # the derived loop, as install runs it
    logits, arguments = _logits_and_experts_arguments(model, experts)
    for skip, seed in ((None, 0), (2, 1)):  # every expert hit (14 tokens, 28 slots, 4 experts); expert 2 without tokens
        hidden, ids, weights = _routing(arguments, experts.num_experts, skip=skip, seed=seed)
        assert len(set(ids.flatten().tolist())) == (4 if skip is None else 3)
        results = []
        for forward in (original, derived):
            experts.zero_grad()
            hidden.grad = None
            out = forward(experts, hidden, ids, weights)
            out.float().pow(2).sum().backward()
            results.append([out.detach(), hidden.grad.clone()] + [p.grad.clone() for p in experts.parameters()])
        for a, b in zip(*results):
            assert a.dtype == b.dtype and torch.equal(a, b)

    # Installed on the model, run eagerly: the same output as the class's forward, and uninstall restores it.
    report = graph_moe.install(model)
    assert [(b.class_name, b.status) for b in report.blocks] == [(class_name, "installed")] * layers, str(report)
    assert torch.equal(_logits_and_experts_arguments(model, experts)[0], logits)
    assert graph_moe.uninstall(model) == layers


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_rewritten_or_reported_and_equal(family):
    class_name, layers, refused = FAMILIES[family]
    model = _build(family)
    reference = copy.deepcopy(model)
    report = graph_moe.install(model)
    assert [(b.class_name, b.status) for b in report.blocks] == [(class_name, "installed")] * layers, str(report)
    assert all(b.weights.startswith("3D, stacked by the model") for b in report.blocks), str(report)
    assert all(isinstance(b.num_experts, int) and isinstance(b.top_k, int) for b in report.blocks), str(report)
    # The MoE blocks (router + experts) compiled on their own: the rest of the model runs eagerly, which keeps
    # tracing to the loops (graph_moe.compile's decoder-layer regions are tested with the standard loops).
    recorder = Recorder()  # aot_eager inside
    blocks = [m for m in model.modules() if type(getattr(m, "experts", None)).__name__ == class_name]
    assert len(blocks) == layers
    compile_regions(blocks, recorder.backend)
    ids = torch.randint(0, 64, (2, 7))
    ref_out, ref_grads = _output_and_grads(reference, ids)
    out, grads = _output_and_grads(model, ids)
    found = counters["graph_moe"]["loops_found"]
    assert found >= 1 and len(recorder.reports) == found, dict(counters["graph_moe"])
    if refused is None:
        assert counters["graph_moe"]["loops_rewritten"] == found, [str(r) for r in recorder.reports]
        assert counters["graph_moe"]["loops_skipped"] == 0
        assert recorder.count("_grouped_mm", "grouped_mm") == 2 * found  # up (gate and up fused), down
        assert recorder.count("index_add_") == 0
    else:  # left as traced, with the reason; still the eager results
        assert counters["graph_moe"]["loops_skipped"] == found and counters["graph_moe"]["loops_rewritten"] == 0
        assert all(refused in r.reason for r in recorder.reports), [str(r) for r in recorder.reports]
    assert_close_bf16(out, ref_out, "output")
    assert grads.keys() == ref_grads.keys()
    assert_grads_close(grads, ref_grads)


# Look-alikes of gpt-oss's loop, each changed in one way the derivation must not accept. Module-level functions,
# so that inspect.getsource reads them as it reads transformers' forwards.


def _extra_effect(self, hidden_states, router_indices=None, routing_weights=None):
    next_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        out = hidden_states[token_idx] @ self.gate_up_proj[expert_idx][:, ::2] @ self.down_proj[expert_idx]
        self.visited.append(expert_idx)
        next_states.index_add_(0, token_idx, out * routing_weights[token_idx, top_k_pos, None])
    return next_states


def _busiest_only(self, hidden_states, router_indices=None, routing_weights=None):
    next_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 3).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        out = hidden_states[token_idx] @ self.gate_up_proj[expert_idx][:, ::2] @ self.down_proj[expert_idx]
        next_states.index_add_(0, token_idx, out * routing_weights[token_idx, top_k_pos, None])
    return next_states


def _carried(self, hidden_states, router_indices=None, routing_weights=None):
    next_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        out = hidden_states[token_idx] @ self.gate_up_proj[expert_idx][:, ::2] @ self.down_proj[expert_idx]
        last = out
        next_states.index_add_(0, token_idx, out * routing_weights[token_idx, top_k_pos, None])
    return next_states + last.sum()


def _in_place(self, hidden_states, router_indices=None, routing_weights=None):
    next_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        out = hidden_states[token_idx] @ self.gate_up_proj[expert_idx][:, ::2] @ self.down_proj[expert_idx]
        out = out.mul_(routing_weights[token_idx, top_k_pos, None])
        next_states.index_add_(0, token_idx, out)
    return next_states


@pytest.mark.parametrize("forward, why", [
    (_extra_effect, "only plain assignments"),
    (_busiest_only, "is not the experts with tokens"),
    (_carried, "last, assigned in the loop, is read outside it"),
    (_in_place, "in-place mul_"),
])
def test_changed_loops_are_refused(forward, why):
    config = _build("gpt_oss").config
    # A class of the listed name, as a remote-code or other-version gpt-oss would be.
    lookalike = use_experts_implementation(is_transposed=True, has_bias=True)(
        type("GptOssExperts", (GptOssExperts,), {"forward": forward}))
    reason = unsupported_reason(lookalike(config))
    assert reason is not None and "cannot become a range loop" in reason and why in reason, reason
    assert unsupported_reason(GptOssExperts(config)) is None
    parallel = GptOssExperts(config)
    parallel._is_expert_parallel = True
    assert "expert parallelism" in unsupported_reason(parallel)


def test_lora_on_derived_experts_stays_with_peft():
    """PEFT target_parameters LoRA on a derived-loop class: PEFT's own forward parametrizes the weights (and swaps the
    experts' class for a parametrized subclass) around the derived loop; the report says so; results are PEFT's."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_build("gpt_oss"), peft.LoraConfig(
        r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False))
    reference = copy.deepcopy(model)
    report = graph_moe.install(model)
    assert report.num_installed == 2, str(report)
    # gpt-oss reads its transposed weights as x @ W[e]: no LoRA factors can be added there
    assert all("left to PEFT" in b.weights and "other than as F.linear" in b.weights for b in report.blocks), \
        str(report)
    ids = torch.randint(0, 64, (2, 7))
    (out, grads), (ref_out, ref_grads) = _output_and_grads(model, ids), _output_and_grads(reference, ids)
    assert torch.equal(out, ref_out) and grads.keys() == ref_grads.keys()
    assert any("lora" in name for name in grads)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name

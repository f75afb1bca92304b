"""transformers 5.x models exactly as users load them (from_config, no experts_implementation asked for: 5.x's default
"grouped_mm"): graph_moe.compile takes every MoE layer's experts over and rewrites its loop; float32 logits and every
gradient equal the untouched model's tightly, bfloat16 logits within bf16 rounding. Run on several 5.x releases
(.ci/run): the loops are derived from whichever release is installed."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graph_moe  # noqa: E402
from helpers import assert_close_bf16, loss_and_grads  # noqa: E402

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


def _config(family: str):
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**_COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                           head_dim=8)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                           num_experts=4, num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if family == "olmoe":
        return transformers.OlmoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if family == "ernie4_5_moe":
        return transformers.Ernie4_5_MoeConfig(**_COMMON, moe_intermediate_size=32, moe_num_experts=4, moe_k=2,
                                               moe_layer_start_index=0, moe_num_shared_experts=1)
    assert family == "gpt_oss"
    return transformers.GptOssConfig(**_COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=8)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "ernie4_5_moe"]


def _model(family, dtype):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(family)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_as_loaded_every_layer_rewritten_and_equal(family, dtype):
    model = _model(family, dtype)
    assert model.config._experts_implementation == "grouped_mm"
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    report = model._graph_moe_install_report
    assert report.num_installed == 2 and all(b.form == "grouped_mm" for b in report.blocks), str(report)
    ids = torch.randint(0, 64, (2, 9))
    logits, grads = loss_and_grads(model, ids)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    # graph_moe.compile compiles each decoder layer on its own; identical layers share one rewritten graph
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0, \
        dict(counters["graph_moe"])
    if dtype == torch.float32:
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert grads.keys() == ref_grads.keys() and any("experts" in name for name in grads)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
    else:
        assert_close_bf16(logits, ref_logits, "logits")

"""expert_stacks.py: state-dict hooks of stacked experts and stacked LoRA adapters, where checkpoints are unusual."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import graph_moe
from tiny_models import build


def _stacked(kind: str):
    """A model with stacked expert weights or stacked LoRA adapters, and the name of one expert's stacked weight."""
    model = build("qwen3_moe")
    if kind == "experts":
        graph_moe.install(model, stack_experts=True)
        return model, "model.layers.1.mlp.experts.2.down_proj.weight"
    model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, target_modules=["up_proj", "down_proj"]),
                           autocast_adapter_dtype=False)
    graph_moe.install(model)
    return model, "base_model.model.model.layers.1.mlp.experts.2.down_proj.lora_B.default.weight"


@pytest.mark.parametrize("kind", ["experts", "adapters"])
def test_state_dict_rows_with_keep_vars_are_detached(kind):
    model, key = _stacked(kind)
    state = model.state_dict(keep_vars=True)
    assert not state[key].requires_grad
    copy.deepcopy(state)  # autograd views would refuse


@pytest.mark.parametrize("kind", ["experts", "adapters"])
def test_a_row_of_another_shape_is_reported_under_its_own_key(kind):
    model, key = _stacked(kind)
    state = model.state_dict()
    state[key] = state[key][:1]  # would broadcast into the stack's rows
    with pytest.raises(RuntimeError, match=f"size mismatch for {key}: copying a param with shape"):
        model.load_state_dict(state)


@pytest.mark.parametrize("kind", ["experts", "adapters"])
def test_a_checkpoint_without_one_stacks_keys_loads_the_other_stacks(kind):
    model, key = _stacked(kind)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    del state[key]
    result = model.load_state_dict(state, strict=False)
    stack = key.split(".experts.")[0] + (".graph_moe_experts.down" if kind == "experts"
                                         else ".graph_moe_adapters.down_proj.default.lora_B")
    assert result.missing_keys == [stack] and len(result.unexpected_keys) == 3, result
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in result.unexpected_keys)

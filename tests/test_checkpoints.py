"""save_pretrained after graph_moe writes transformers' own checkpoint, bit for bit, and from_pretrained reads it back:
after install (plain and with stacked expert weights), after graph_moe.compile, and after PEFT's merge_and_unload of
adapters that graph_moe stacked."""

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import graph_moe
from tiny_models import build


def _saved(model, path):
    model.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


def _assert_same_files(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("way", ["install", "install stacked", "compile"])
def test_saved_checkpoint_is_transformers_own(tmp_path, way):
    model = build("qwen3_moe")
    reference = copy.deepcopy(model)
    if way == "compile":
        graph_moe.compile(model, inner="aot_eager")
    else:
        graph_moe.install(model, stack_experts=way == "install stacked")
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()  # after a step's forward and backward too
    _assert_same_files(_saved(model, tmp_path / "got"), _saved(reference, tmp_path / "want"))
    loaded, expected = (tf.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16)
                        for name in ("got", "want"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)


def test_merge_and_unload_saves_transformers_own_checkpoint(tmp_path):
    config = LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build("qwen3_moe"), config, autocast_adapter_dtype=False)
    reference = copy.deepcopy(model)
    graph_moe.compile(model, inner="aot_eager")
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    merged, ref_merged = model.merge_and_unload(), reference.merge_and_unload()
    _assert_same_files(_saved(merged, tmp_path / "got"), _saved(ref_merged, tmp_path / "want"))
    assert set(load_file(str(tmp_path / "got" / "model.safetensors"))) == set(build("qwen3_moe").state_dict())

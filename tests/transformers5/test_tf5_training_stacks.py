"""transformers 5.x models as loaded under the training stacks: the HF Trainer with graph_moe's callback (LoRA on the
3D experts through PEFT target_parameters, gradient accumulation), and TRL's SFTTrainer where TRL imports. Eager's
losses, every expert loop rewritten."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("transformers", minversion="5", reason="transformers 5.x tests (tests/transformers5)")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graph_moe  # noqa: E402
from helpers import TokenRows  # noqa: E402
from tiny_models import build  # noqa: E402

EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _settings(out_dir):
    return dict(output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=3, logging_steps=1, report_to=[],
                use_cpu=True, bf16=True, learning_rate=1e-2, disable_tqdm=True, save_strategy="no")


def _losses(trainer):
    trainer.train()
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])


def test_trainer_callback_with_lora_on_3d_experts(tmp_path):
    counters.clear()
    config = LoraConfig(r=4, target_modules=[], target_parameters=EXPERT_PARAMETERS, init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build("qwen3_moe"), config, autocast_adapter_dtype=False)
    reference = copy.deepcopy(model)
    data = TokenRows(list(torch.randint(0, 64, (12, 12))))
    args = dict(gradient_accumulation_steps=2)
    got = _losses(tf.Trainer(model=model, args=tf.TrainingArguments(**_settings(tmp_path / "a"), **args),
                             train_dataset=data, callbacks=[graph_moe.GraphMoeCallback(inner="aot_eager")]))
    want = _losses(tf.Trainer(model=reference, args=tf.TrainingArguments(**_settings(tmp_path / "b"), **args),
                              train_dataset=data))
    assert len(got) == 3
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0


def test_trl_sft_trainer_with_lora_on_3d_experts(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from graph_moe.tools.model_zoo import word_texts, word_tokenizer

    counters.clear()
    data = datasets.Dataset.from_dict({"text": word_texts(8, 12, 64, torch.Generator().manual_seed(0))})

    def trainer(callbacks, out):
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=[], target_parameters=EXPERT_PARAMETERS, init_lora_weights=False)
        return trl.SFTTrainer(model=build("qwen3_moe"), args=trl.SFTConfig(**_settings(out), max_length=32),
                              train_dataset=data, processing_class=word_tokenizer(64), peft_config=config,
                              callbacks=callbacks)

    got = _losses(trainer([graph_moe.GraphMoeCallback(inner="aot_eager")], tmp_path / "a"))
    rewritten = counters["graph_moe"]["loops_rewritten"]
    want = _losses(trainer([], tmp_path / "b"))
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)
    assert rewritten >= 1 and counters["graph_moe"]["loops_skipped"] == 0

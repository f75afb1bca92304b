"""TRL's trainers with graph_moe's Trainer callback, LoRA on every expert projection: SFTTrainer, and DPOTrainer
whose reference is the same model with its adapter disabled, or a second, named reference adapter. Eager's losses,
every expert loop rewritten into grouped GEMMs."""

import pytest

trl = pytest.importorskip("trl")

import datasets  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graph_moe  # noqa: E402
from graph_moe.tools.model_zoo import word_texts, word_tokenizer  # noqa: E402
from tiny_models import build  # noqa: E402

VOCAB = 64


def _text(words, generator):
    return word_texts(1, words, VOCAB, generator)[0]


def _settings(tmp_path):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, logging_steps=1, report_to=[],
                use_cpu=True, bf16=True, learning_rate=1e-2, disable_tqdm=True, save_strategy="no", max_length=32)


def _lora():
    # init_lora_weights=False: the adapters start non-zero, so that the policy differs from DPO's reference
    return LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)


def _losses(trainer):
    trainer.train()
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])


def _check(make_trainer):
    counters.clear()
    torch.manual_seed(0)
    got = _losses(make_trainer([graph_moe.GraphMoeCallback(inner="aot_eager")]))
    rewritten, skipped = counters["graph_moe"]["loops_rewritten"], counters["graph_moe"]["loops_skipped"]
    torch.manual_seed(0)
    want = _losses(make_trainer([]))
    assert len(got) == 3
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    assert rewritten >= 1 and skipped == 0


def test_sft_trainer_with_lora_on_the_experts(tmp_path):
    generator = torch.Generator().manual_seed(1)
    data = datasets.Dataset.from_dict({"text": [_text(12, generator) for _ in range(8)]})
    _check(lambda callbacks: trl.SFTTrainer(model=build("qwen3_moe"), args=trl.SFTConfig(**_settings(tmp_path)),
                                            train_dataset=data, processing_class=word_tokenizer(VOCAB),
                                            peft_config=_lora(), callbacks=callbacks))


def test_dpo_trainer_with_the_adapter_disabled_as_reference(tmp_path):
    generator = torch.Generator().manual_seed(2)
    data = datasets.Dataset.from_dict({key: [_text(words, generator) for _ in range(8)]
                                       for key, words in (("prompt", 6), ("chosen", 4), ("rejected", 4))})
    _check(lambda callbacks: trl.DPOTrainer(model=build("qwen3_moe"), args=trl.DPOConfig(**_settings(tmp_path)),
                                            train_dataset=data, processing_class=word_tokenizer(VOCAB),
                                            peft_config=_lora(), callbacks=callbacks))


def test_dpo_trainer_with_a_reference_adapter(tmp_path):
    """Two adapters on the experts, the policy trained and a named reference adapter for DPO's reference
    log-probabilities (`model_adapter_name` / `ref_adapter_name`): TRL switches the active adapter between them."""
    from peft import get_peft_model

    generator = torch.Generator().manual_seed(3)
    data = datasets.Dataset.from_dict({key: [_text(words, generator) for _ in range(8)]
                                       for key, words in (("prompt", 6), ("chosen", 4), ("rejected", 4))})

    def trainer(callbacks):
        model = get_peft_model(build("qwen3_moe"), _lora(), adapter_name="policy")
        model.add_adapter("reference", _lora())
        model.set_adapter("policy")
        args = trl.DPOConfig(**_settings(tmp_path), model_adapter_name="policy", ref_adapter_name="reference")
        return trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(VOCAB),
                              callbacks=callbacks)

    _check(trainer)

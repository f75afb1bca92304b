"""The HF Trainer with graph_moe: `callbacks=[graph_moe.GraphMoeCallback()]` (or `graph_moe.compile(model)` before
building the Trainer), the Trainer's own `torch_compile` off. Eager's losses, with every expert loop rewritten into
grouped GEMMs; gradient accumulation, gradient checkpointing and resume_from_checkpoint go through."""

import copy

import pytest
import safetensors.torch
import torch
import transformers as tf
from torch._dynamo.utils import counters

import graph_moe
from helpers import TokenRows
from tiny_models import build


def _arguments(out_dir, **extra):
    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=3, logging_steps=1, report_to=[],
                    use_cpu=True, bf16=True, learning_rate=1e-2, disable_tqdm=True, save_strategy="no")
    return tf.TrainingArguments(**{**settings, **extra})


def _train(model, data, args, callbacks=(), **train_kwargs):
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    trainer.train(**train_kwargs)
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _model():
    model = build("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.experts.requires_grad_(False)  # frozen experts, trained attention and router (as under LoRA)
    return model


def _data(rows=8):
    return TokenRows(list(torch.randint(0, 64, (rows, 12))))


def _assert_trained_alike(model, reference, initial, losses, ref_losses):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=3e-2, rtol=2e-2)
    trained, ref_trained = (m.model.layers[0].self_attn.q_proj.weight.detach() for m in (model, reference))
    update = (ref_trained - initial).float().abs().mean()
    assert update > 1e-3  # the optimizer stepped
    # Adam's steps are about lr per element whatever the gradient's size: bf16 rounding flips a few small ones
    assert (trained - ref_trained).float().abs().mean() < 0.1 * update
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0


def test_trainer_on_a_graph_moe_compiled_model_matches_eager(tmp_path):
    counters.clear()
    model = _model()
    reference, data = copy.deepcopy(model), _data()
    initial = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    graph_moe.compile(model, inner="aot_eager")
    _, losses = _train(model, data, _arguments(tmp_path / "graph_moe"))
    _, ref_losses = _train(reference, data, _arguments(tmp_path / "eager"))
    assert len(losses) == 3
    _assert_trained_alike(model, reference, initial, losses, ref_losses)
    assert counters["graph_moe"]["loops_traced_once"] >= 1


def test_callback_with_accumulation_and_checkpointing_matches_eager(tmp_path):
    counters.clear()
    model = _model()
    reference, data = copy.deepcopy(model), _data(12)
    initial = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    extra = dict(gradient_accumulation_steps=2, gradient_checkpointing=True)
    _, losses = _train(model, data, _arguments(tmp_path / "graph_moe", **extra),
                       [graph_moe.GraphMoeCallback(inner="aot_eager")])
    _, ref_losses = _train(reference, data, _arguments(tmp_path / "eager", **extra))
    assert len(losses) == 3
    _assert_trained_alike(model, reference, initial, losses, ref_losses)
    assert model._graph_moe_install_report.num_installed == len(model.model.layers)


def test_callback_resumes_from_a_checkpoint_holding_transformers_names(tmp_path):
    data = _data()
    whole, _ = _train(_model(), data, _arguments(tmp_path / "whole", max_steps=4),
                      [graph_moe.GraphMoeCallback(inner="aot_eager")])
    first, _ = _train(_model(), data, _arguments(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
                      [graph_moe.GraphMoeCallback(inner="aot_eager")])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) == set(build("qwen3_moe").state_dict())
    resumed, _ = _train(_model(), data, _arguments(tmp_path / "run", max_steps=4),
                        [graph_moe.GraphMoeCallback(inner="aot_eager")], resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, got), want in zip(resumed.model.named_parameters(), first.model.parameters()):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=name)
    for got, want in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_callback_refuses_the_trainers_own_compile(tmp_path, monkeypatch):
    # TrainingArguments(torch_compile=True) exports the backend for accelerate: undone after the test
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")
    with pytest.raises(ValueError, match="leave TrainingArguments' torch_compile off"):
        tf.Trainer(model=_model(), args=_arguments(tmp_path, torch_compile=True), train_dataset=_data(),
                   callbacks=[graph_moe.GraphMoeCallback()])

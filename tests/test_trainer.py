"""The HF Trainer on a model compiled by `graph_moe.compile` (the Trainer's own `torch_compile` left off): the same
losses as eager training, with every expert loop rewritten into grouped GEMMs."""

import copy

import torch
import transformers as tf
from torch._dynamo.utils import counters

import graph_moe
from tiny_models import build


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _train(model, data, out_dir) -> list[float]:
    args = tf.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=3,
                                logging_steps=1, report_to=[], use_cpu=True, bf16=True, learning_rate=1e-2,
                                disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_on_a_graph_moe_compiled_model_matches_eager(tmp_path):
    model = build("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.experts.requires_grad_(False)  # frozen experts, trained attention and router (as under LoRA)
    reference = copy.deepcopy(model)
    initial = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    data = TokenRows(list(torch.randint(0, 64, (8, 12))))
    graph_moe.compile(model, inner="aot_eager")
    losses = _train(model, data, tmp_path / "graph_moe")
    ref_losses = _train(reference, data, tmp_path / "eager")
    assert len(losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=3e-2, rtol=2e-2)
    trained, ref_trained = (m.model.layers[0].self_attn.q_proj.weight.detach() for m in (model, reference))
    update = (ref_trained - initial).float().abs().mean()
    assert update > 1e-3  # the optimizer stepped
    # Adam's steps are about lr per element whatever the gradient's size: bf16 rounding flips a few small ones
    assert (trained - ref_trained).float().abs().mean() < 0.1 * update
    assert counters["graph_moe"]["loops_rewritten"] >= 1 and counters["graph_moe"]["loops_skipped"] == 0
    assert counters["graph_moe"]["loops_traced_once"] >= 1

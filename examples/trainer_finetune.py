"""The HF Trainer with graph_moe: one callback, the Trainer's own torch_compile left off.

    python examples/trainer_finetune.py --inner aot_eager --steps 3

`graph_moe.GraphMoeCallback()` compiles the model when the Trainer is built (graph_moe.compile: each decoder layer
compiled on its own, the expert loops rewritten into grouped GEMMs). Gradient accumulation, gradient checkpointing and
resume_from_checkpoint work as without it; checkpoints hold transformers' own parameter names.
"""

import argparse
import tempfile

import torch
import transformers as tf

import graph_moe
from graph_moe.tools.model_zoo import build_model


class TokenRows(torch.utils.data.Dataset):
    """Random token rows, each its own label (a causal LM's training data)."""

    def __init__(self, rows: int, length: int, vocab: int):
        self.rows = torch.randint(0, vocab, (rows, length))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    cpu = not torch.cuda.is_available()
    model = build_model("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64, intermediate=64,
                        device="cpu" if cpu else "cuda")
    model.config.use_cache = False  # training builds no KV cache: one compiled graph for all decoder layers
    with tempfile.TemporaryDirectory() as out:
        training = tf.TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                        gradient_checkpointing=True, max_steps=args.steps, logging_steps=1,
                                        learning_rate=1e-3, bf16=True, use_cpu=cpu, report_to=[], save_strategy="no",
                                        disable_tqdm=True)
        trainer = tf.Trainer(model=model, args=training, train_dataset=TokenRows(64, 32, model.config.vocab_size),
                             callbacks=[graph_moe.GraphMoeCallback(inner=args.inner)])
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: loss {loss:.4f}")
    print(graph_moe.counter_snapshot())


if __name__ == "__main__":
    main()

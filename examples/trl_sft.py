"""TRL's SFTTrainer with LoRA on every expert projection, through graph_moe.

    python examples/trl_sft.py --inner aot_eager --steps 3

TRL adds the adapters (`peft_config`), then `graph_moe.GraphMoeCallback()` compiles the wrapped model: the frozen
experts and their adapters run as grouped GEMMs. DPOTrainer takes the same callback (its reference model is the same
model with the adapter disabled). The model and tokenizer are built here from a config: nothing is downloaded.
"""

import argparse
import tempfile

import datasets
import torch
import trl
from peft import LoraConfig

import graph_moe
from graph_moe.tools.model_zoo import build_model, word_texts, word_tokenizer

VOCAB = 256


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    cpu = not torch.cuda.is_available()
    model = build_model("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64, intermediate=64, vocab=VOCAB,
                        device="cpu" if cpu else "cuda")
    texts = word_texts(64, 24, VOCAB)
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=args.steps, logging_steps=1,
                               learning_rate=1e-3, bf16=True, use_cpu=cpu, report_to=[], save_strategy="no",
                               disable_tqdm=True, max_length=64)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                                 processing_class=word_tokenizer(VOCAB),
                                 peft_config=LoraConfig(r=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
                                 callbacks=[graph_moe.GraphMoeCallback(inner=args.inner)])
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: loss {loss:.4f}")
    print(graph_moe.counter_snapshot())


if __name__ == "__main__":
    main()

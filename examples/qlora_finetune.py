"""QLoRA through graph_moe: 4-bit (NF4) experts, LoRA on every expert projection, gradient checkpointing.

The model is built from a Qwen3-MoE config with random weights, saved, and loaded back with bitsandbytes'
`BitsAndBytesConfig(load_in_4bit=True)` (the path a user takes with a hub checkpoint). graph_moe stacks each
projection's packed 4-bit weights once (every expert's weight becomes a view: no bf16 copy is kept), dequantizes
the experts a few at a time inside the grouped GEMMs (on CUDA; a layer's peak memory below the HF loop's), and runs
the base and the adapters as grouped GEMMs. With --whole-4bit-stacks it dequantizes all experts of a projection at
once (faster, more peak memory: README, "4-bit experts").

    python examples/qlora_finetune.py --inner aot_eager --steps 3
"""

import argparse
import tempfile

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

import graph_moe
from graph_moe.tools.model_zoo import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--whole-4bit-stacks", action="store_true",
                   help="dequantize all 4-bit experts of a projection at once (low_memory_4bit=False)")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as path:
        build_model("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64, intermediate=64).save_pretrained(path)
        quantization = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type,
                                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                                        device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    model.print_trainable_parameters()

    graph_moe.compile(model, inner=args.inner, low_memory_4bit=not args.whole_4bit_stacks)
    print(model._graph_moe_install_report)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
    model.train()  # as the HF Trainer does (in eval mode bitsandbytes would repack 4-bit weights for its CPU kernel)
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    print("graph_moe counters:", graph_moe.counter_snapshot())


if __name__ == "__main__":
    main()

"""LoRA on every expert projection (PEFT), fine-tuned through graph_moe.

The frozen expert weights are laid out once for grouped GEMMs; the adapters are grouped per expert
(x·A, then ·B, times scaling). On a GPU, `autocast_adapter_dtype=False` keeps the adapters in bf16,
so every GEMM takes torch._grouped_mm (float32 adapters take graph_moe's fallback op).

    python examples/lora_finetune.py --inner aot_eager --steps 3
"""

import argparse

import torch
from peft import LoraConfig, get_peft_model

import graph_moe
from graph_moe.tools.model_zoo import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64, intermediate=64, device=device)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config, autocast_adapter_dtype=False)
    model.print_trainable_parameters()

    graph_moe.compile(model, inner=args.inner)
    print(model._graph_moe_install_report)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    print("graph_moe counters:", graph_moe.counter_snapshot())


if __name__ == "__main__":
    main()

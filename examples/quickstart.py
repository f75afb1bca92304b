"""Quickstart: a Qwen3-MoE built from a config, compiled with graph_moe, trained for a few steps.

    python examples/quickstart.py                 # Inductor (the default inner compiler)
    python examples/quickstart.py --inner aot_eager   # faster to compile on a CPU
"""

import argparse
import logging

import torch

import graph_moe
from graph_moe.tools.model_zoo import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64, intermediate=64, device=device)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)

    print(graph_moe.explain(model, ids))          # what will be rewritten, and why
    graph_moe.compile(model, inner=args.inner)    # install + capture settings + one compile per decoder layer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    print("graph_moe counters:", graph_moe.counter_snapshot())


if __name__ == "__main__":
    main()

"""Generation with the KV cache on a model compiled by graph_moe.

    python examples/generate.py --inner aot_eager --layers 8

`graph_moe.compile(model)` compiles each decoder layer for training; a layer called with a KV cache runs its attention
eagerly and its MoE block compiled alone, so that every layer shares the block's graphs: one for prefill, one for
decode, whatever the depth. The tokens equal eager's (greedy decoding, float32 here).
"""

import argparse
import copy

import torch
from torch._dynamo.utils import counters

import graph_moe
from graph_moe.tools.model_zoo import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model("qwen3_moe", layers=args.layers, experts=8, top_k=2, hidden=64, intermediate=64,
                        dtype=torch.float32, device=device).eval()
    model.requires_grad_(False)  # inference: the expert weights laid out once, not stacked on every step
    eager = copy.deepcopy(model)
    graph_moe.compile(model, inner=args.inner)
    prompts = torch.randint(0, model.config.vocab_size, (4, 12), device=device)
    tokens = model.generate(prompts, max_new_tokens=args.new_tokens, do_sample=False)
    expected = eager.generate(prompts, max_new_tokens=args.new_tokens, do_sample=False)
    print(f"{args.layers} layers: {counters['stats']['unique_graphs']} compiled graph(s); "
          f"tokens equal to eager: {torch.equal(tokens, expected)}")
    print(graph_moe.counter_snapshot())


if __name__ == "__main__":
    main()

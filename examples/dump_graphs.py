"""Dump the graphs graph_moe works on: a tiny Qwen3-MoE (random weights) compiled under depyf.

    python examples/dump_graphs.py [out_dir] [--inner inductor|aot_eager|eager] [--tokens N]

Writes, side by side in out_dir, the graph as Dynamo captured it (one `index_add_` per expert), the same
graph after graph_moe's rewrite (`torch._grouped_mm`), Inductor's stages and kernel, and
graph_moe_index.md naming each MoE loop and the files to open. Add TORCH_LOGS=graph_moe to see one log
line per loop as it is rewritten or skipped.
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

from graph_moe.tools.dump import dump


def tiny_qwen3_moe(experts: int = 8, top_k: int = 2, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1)
    # bf16: torch._grouped_mm compiles only in bfloat16; float32 loops are reported and left as traced.
    return tf.Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="graph_moe_dump")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = tiny_qwen3_moe()
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    index = dump(model, input_ids, out_dir=args.out_dir, inner=args.inner, use_cache=False)

    for loop in index.loops:
        print(loop)
    print(f"\nindex: {index.index}")
    print("open these, in this order:")
    for what, path in zip(("captured by Dynamo", "rewritten by graph_moe", "compiled"), index.files_to_open()):
        print(f"  {what:24} {path}")


if __name__ == "__main__":
    main()

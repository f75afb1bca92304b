"""graph_moe (Inductor, on the GPU) against eager: output, input gradient and adapter gradients of one MoE layer.

    python benchmarks/diagnostics/layer_gradients_vs_eager.py --tokens 4096

Qwen3-30B-A3B shape, frozen experts and LoRA r=16. Prints relative errors (bf16 level is ~1e-2) and the adapters'
gradient norm (stacked by graph_moe, per expert in eager: the norm is what both share).
"""

import argparse
import copy

import torch

from graph_moe.tools.bench_layer import benchmark_block, block_variant, graph_moe_block


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def grad_norm(grads) -> float:
    return torch.sqrt(sum((g ** 2).sum() for g in grads)).item() if grads else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    block = benchmark_block()
    for kind in ("frozen", "lora"):
        eager = block_variant(kind, block)
        compiled = graph_moe_block(copy.deepcopy(eager))
        x = torch.randn(1, args.tokens, block.gate.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        seed = torch.randn_like(x)
        results = {}
        for name, fn, module in (("eager", lambda t: eager(t)[0], eager), ("graph_moe", compiled, compiled.module)):
            x.grad = None
            out = fn(x)
            out.backward(seed)
            results[name] = (out.float(), x.grad.float(), [q.grad.float() for q in module.parameters() if q.requires_grad])
        (out, grad_x, grads), (ref, ref_grad_x, ref_grads) = results["graph_moe"], results["eager"]
        print(f"{kind}: output rel err {relative_error(out, ref):.2e}, input grad rel err "
              f"{relative_error(grad_x, ref_grad_x):.2e}, adapter grad norm {grad_norm(grads):.4e} "
              f"(eager {grad_norm(ref_grads):.4e})", flush=True)


if __name__ == "__main__":
    main()

"""Profile one graph_moe-compiled MoE layer on the GPU: where does forward+backward spend its time?

    python benchmarks/diagnostics/layer_kernel_profile.py --variant lora --tokens 4096

Prints the top CUDA kernels by total time (torch.profiler) for the Qwen3-30B-A3B shape.
"""

import argparse

import torch

from graph_moe.tools.bench_layer import SHAPES, benchmark_block, block_variant, graph_moe_block, grouped_reference


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", nargs="+", default=["lora"], choices=["frozen", "lora", "qlora", "v5c"],
                   help="v5c: the transformers 5.x-style grouped forward under torch.compile (the peer), frozen")
    p.add_argument("--forward-only", action="store_true", help="profile the forward alone (no_grad)")
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    block = benchmark_block(args.shape)
    for variant in args.variant:
        if variant == "v5c":
            fn = torch.compile(grouped_reference(block), fullgraph=True)
        else:
            fn = graph_moe_block(block_variant(variant, block))
        for tokens in args.tokens:
            profile(fn, variant, tokens, args)


def profile(fn, variant, tokens, args):
    x = torch.randn(1, tokens, SHAPES[args.shape][2], device="cuda", dtype=torch.bfloat16,
                    requires_grad=not args.forward_only)
    grad = torch.randn_like(x)

    def step():
        if args.forward_only:
            with torch.no_grad():
                fn(x)
        else:
            x.grad = None  # as in training: no AccumulateGrad add of the input's gradient
            fn(x).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"=== {variant}, {tokens} tokens, 5 {'forwards' if args.forward_only else 'forward+backward'}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=110))


if __name__ == "__main__":
    main()

"""Profile one graph_moe-compiled MoE layer on the GPU: where does forward+backward spend its time?

    python benchmarks/profile_layer.py --variant lora --tokens 4096

Prints the top CUDA kernels by total time (torch.profiler) for the Qwen3-30B-A3B shape.
"""

import argparse

import torch

from graph_moe.bench import SHAPES, graph_moe_block, hf_block, with_lora, with_nf4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", nargs="+", default=["lora"], choices=["frozen", "lora", "qlora"])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64
    block = hf_block(SHAPES[args.shape])
    for variant in args.variant:
        target = {"frozen": block, "lora": lambda: with_lora(block), "qlora": lambda: with_lora(with_nf4(block))}[variant]
        fn = graph_moe_block(target() if callable(target) else target)
        x = torch.randn(1, args.tokens, SHAPES[args.shape][2], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        for _ in range(3):
            fn(x).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(x).backward(grad)
            torch.cuda.synchronize()
        print(f"=== {variant}, {args.tokens} tokens, 5 forward+backward")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()

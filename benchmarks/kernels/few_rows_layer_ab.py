"""One Qwen3-30B-A3B-shaped MoE layer on a GPU with graph_moe::grouped_mm_few_rows' Triton kernel against the same
compiled graph calling CUTLASS (the op's CONFIGS emptied between calls), in interleaved rounds in one process; then
under CUDA graphs (mode="reduce-overhead"), each variant captured with its own kernels.

    python benchmarks/kernels/few_rows_layer_ab.py --tokens 64 512 4096 --json out.json

The layer is compiled with the op emitted wherever the weights are frozen (`_few_rows_op_fits` patched to ignore
whether Inductor captures CUDA graphs, as the pass did up to commit 1b6b0b7). ms per call, each waited for and back
to back (`graph_moe.tools.bench_layer.cuda_time`), forward and forward+backward (input gradient), frozen experts.
"""

from __future__ import annotations

import argparse
import json

import torch

from graph_moe.tools.bench_layer import cuda_time, benchmark_block, card_ceilings, graph_moe_block, roofline_ms
from graph_moe.passes import emit_grouped
from graph_moe.kernels import grouped_mm_few_rows as few

SHAPE = (128, 8, 2048, 768)
TRITON = few.CONFIGS


def _steps(fn, tokens):
    x = torch.randn(1, tokens, SHAPE[2], device="cuda", dtype=torch.bfloat16)
    xg, grad = x.clone().requires_grad_(), torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            fn(x)

    def fwd_bwd():
        xg.grad = None
        fn(xg).backward(grad)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def _use(variant):
    few.CONFIGS = TRITON if variant == "triton" else ()


def _ab(label, fns, tokens, results, rounds=5):
    row = {"label": label, "tokens": tokens,
           "roofline_ms": [roofline_ms(SHAPE, tokens, results["ceilings"], b) for b in (False, True)]}
    for kind in ("fwd", "fwd_bwd"):
        steps = {variant: _steps(fn, tokens)[kind] for variant, fn in fns.items()}
        for variant, step in steps.items():
            _use(variant)
            step(), step()
        times = {variant: {"waited": [], "back_to_back": []} for variant in steps}
        for _ in range(rounds):
            for variant, step in steps.items():
                _use(variant)
                times[variant]["waited"].append(cuda_time(step, iters=10))
                times[variant]["back_to_back"].append(cuda_time(step, iters=10, back_to_back=True))
        _use("triton")
        row[kind] = {v: {m: sorted(ts)[len(ts) // 2] for m, ts in t.items()} for v, t in times.items()}
        print(label, tokens, kind, row[kind], flush=True)
    results["rows"].append(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--cuda-graph-tokens", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    emit_grouped._few_rows_op_fits = lambda x, w: x.device.type == "cuda" and not w.requires_grad
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": card_ceilings(),
               "rows": []}
    block = benchmark_block()
    fn = graph_moe_block(block)
    for tokens in args.tokens:
        _ab("default mode", {"triton": fn, "cutlass": fn}, tokens, results)
    captured = {}
    for variant in ("cutlass", "triton"):  # each captured with its own kernels
        _use(variant)
        captured[variant] = graph_moe_block(block, mode="reduce-overhead")
        for step in _steps(captured[variant], args.cuda_graph_tokens).values():
            for _ in range(4):
                step()
    _use("triton")
    _ab("reduce-overhead", captured, args.cuda_graph_tokens, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

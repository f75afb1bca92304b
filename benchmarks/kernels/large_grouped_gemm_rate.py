"""The grouped GEMMs of a few-expert, large-shape layer (Mixtral-8x7B: 8 experts, top-2, hidden 4096, intermediate
14336) on a GPU: how close each kernel gets to the card's dense GEMM rate, the rate the roofline uses.

    python benchmarks/kernels/large_grouped_gemm_rate.py --tokens 16384 --json out.json

For each projection (gate+up: rows x 4096 @ 4096 x 28672; down: rows x 14336 @ 14336 x 4096), TFLOP/s of:
- grouped: torch._grouped_mm (CUTLASS on sm90), what graph_moe and transformers 5.x run;
- autotuned: the same call compiled with mode="max-autotune-no-cudagraphs" (Inductor's Triton grouped-GEMM
  template against ATen's, fixed shapes);
- per_expert: one cuBLAS torch.mm per expert on the same rows (needs the counts on the host: not a graph_moe path,
  the rate a grouped kernel could reach);
- dense: one torch.mm over all rows with one expert's weight (the same FLOPs in one GEMM);
- dense_8192: the 8192^3 GEMM the roofline is measured on.
Routing is random (top-k of a random softmax), so the experts get uneven row counts as in a real layer.
"""

from __future__ import annotations

import argparse
import json

import torch

from graph_moe.tools.bench_layer import cuda_time

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 8, 2, 4096, 14336


def _time_ms(fn):
    return sorted(cuda_time(fn, warmup=3, iters=10, back_to_back=True) for _ in range(3))[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--no-autotune", action="store_true", help="skip the max-autotune compile (minutes)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "dense_8192_tflops": 2 * 8192 ** 3 / _time_ms(lambda: a @ a) / 1e9, "runs": []}
    del a
    print(f"{results['device']}, torch {results['torch']}: dense 8192^3 {results['dense_8192_tflops']:.0f} TFLOP/s")
    projections = {"gate_up": (HIDDEN, 2 * INTERMEDIATE), "down": (INTERMEDIATE, HIDDEN)}
    for tokens in args.tokens:
        experts = torch.randn(tokens, EXPERTS, device="cuda").softmax(-1).topk(TOP_K, dim=-1).indices.flatten()
        counts = torch.bincount(experts, minlength=EXPERTS)
        offsets = counts.cumsum(0).to(torch.int32)
        rows = tokens * TOP_K
        for name, (k, n) in projections.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(EXPERTS, n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5  # (E, out, in) as stored
            wt = w.transpose(-2, -1)
            flops = 2 * rows * k * n
            starts = [0] + offsets.tolist()
            run = {"tokens": tokens, "projection": name, "rows_per_expert": counts.tolist()}

            def grouped():
                return torch._grouped_mm(x, wt, offs=offsets)

            def per_expert():
                return [x[s:e] @ wt[i] for i, (s, e) in enumerate(zip(starts[:-1], starts[1:]))]

            timed = {"grouped": grouped, "per_expert": per_expert, "dense": lambda: x @ wt[0]}
            if not args.no_autotune:
                timed["autotuned"] = torch.compile(lambda x, wt, offs: torch._grouped_mm(x, wt, offs=offs),
                                                   mode="max-autotune-no-cudagraphs", dynamic=False)
            for label, fn in timed.items():
                call = (lambda fn=fn: fn(x, wt, offsets)) if label == "autotuned" else fn
                if label == "autotuned":
                    torch.testing.assert_close(call(), grouped(), atol=0.1, rtol=0.05)  # the compile, and a check
                ms = _time_ms(call)
                run[f"{label}_ms"], run[f"{label}_tflops"] = ms, flops / ms / 1e9
                print(f"{tokens} tokens, {name}: {label} {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            results["runs"].append(run)
            del x, w, wt
            torch.cuda.empty_cache()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

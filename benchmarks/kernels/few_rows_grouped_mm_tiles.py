"""The grouped GEMM at few rows per expert on a GPU: torch._grouped_mm (CUTLASS) against the persistent Triton kernel
(graph_moe/kernels/triton_grouped_mm.py) over its tile configs, at the Qwen3-30B-A3B shape (128 experts, top-8, hidden 2048,
intermediate 768); how graph_moe/kernels/grouped_mm_few_rows.py's CONFIGS were chosen.

    python benchmarks/kernels/few_rows_grouped_mm_tiles.py --tokens 1 8 64 512 1024 2048 --json out.json

For each token count, projection (gate+up, down) and direction (forward on the transposed stack; input gradient on
the stack as it is): CUTLASS's time and weight-read rate, and each config's time (GPU time: calls back to back) and
its largest difference from CUTLASS's output.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from graph_moe.tools.bench_layer import cuda_time
from graph_moe.kernels.triton_grouped_mm import run_groups

EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 128, 8, 2048, 768
CONFIGS = [(16, 256, 64, 8, 4), (16, 256, 64, 4, 4), (32, 256, 64, 8, 4), (32, 256, 64, 8, 5), (32, 256, 64, 4, 4),
           (64, 256, 64, 8, 3), (64, 256, 64, 8, 4), (64, 256, 64, 8, 5), (64, 256, 64, 4, 4), (64, 256, 32, 8, 6),
           (64, 512, 32, 8, 4), (128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]
PROGRAMS_PER_SM = (2, 4)


def _time_ms(fn):
    return sorted(cuda_time(fn, warmup=2, iters=20, back_to_back=True) for _ in range(3))[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 1024, 2048])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for tokens in args.tokens:
        ids = torch.randn(tokens, EXPERTS, device="cuda").topk(TOP_K, dim=-1).indices.flatten()
        offs = torch.bincount(ids, minlength=EXPERTS).cumsum(0).to(torch.int32)
        for name, out, inner in (("gate_up", 2 * INTERMEDIATE, HIDDEN), ("down", HIDDEN, INTERMEDIATE)):
            w = torch.randn(EXPERTS, out, inner, device="cuda", dtype=torch.bfloat16) / inner ** 0.5
            for transposed in (False, True):
                b = w if transposed else w.transpose(-2, -1)
                x = torch.randn(ids.numel(), b.shape[1], device="cuda", dtype=torch.bfloat16)
                ref = torch._grouped_mm(x, b, offs=offs)
                cutlass = _time_ms(lambda: torch._grouped_mm(x, b, offs=offs))
                run = {"tokens": tokens, "projection": name, "transposed": transposed, "cutlass_ms": cutlass,
                       "cutlass_weight_tbps": w.numel() * 2 / cutlass / 1e9, "triton": {}}
                y = torch.empty_like(ref)
                for config, per_sm in itertools.product(CONFIGS, PROGRAMS_PER_SM):
                    if b.shape[1] % config[2]:
                        continue

                    def triton():
                        run_groups(x, b, offs, y, 0, EXPERTS, config, per_sm)

                    triton()
                    err = (y.float() - ref.float()).abs().max().item()
                    run["triton"][f"{config} x{per_sm}"] = {"ms": _time_ms(triton), "max_abs_diff": err}
                best = min(run["triton"], key=lambda c: run["triton"][c]["ms"])
                print(f"{tokens:6} {name:8} {'input grad' if transposed else 'forward':10} CUTLASS {cutlass:.4f} ms, "
                      f"best Triton {run['triton'][best]['ms']:.4f} ms {best}", flush=True)
                results["runs"].append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

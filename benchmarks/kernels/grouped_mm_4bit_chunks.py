"""The 4-bit grouped GEMM (graph_moe/kernels/grouped_mm_4bit.py) on a GPU: checked against dequantize + torch._grouped_mm,
its tile configs and chunk sizes timed, at the Qwen3-30B-A3B shape (128 experts, top-8, hidden 2048, intermediate 768).

    python benchmarks/kernels/grouped_mm_4bit_chunks.py --tokens 4096 16384 --json out.json

For each projection (gate+up: rows of hidden give 2 x intermediate; down: intermediate gives hidden) and direction
(forward; `transposed`, the input gradient), at each token count: the relative error of every config against
bitsandbytes' dequantize then torch._grouped_mm (bf16 weights, CUTLASS), each config's and chunk size's time and
transient peak memory, and the time of the path it replaces (dequantize + grouped GEMM) and of the grouped GEMM alone
on bf16 weights.
"""

from __future__ import annotations

import argparse
import json

import torch

from graph_moe.tools.bench_layer import cuda_time
from graph_moe.kernels import grouped_mm_4bit as op

CONFIGS = [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
CHUNK_MB = [op.CHUNK_BYTES // 2**20, 128, 1024]


def _time_ms(fn):
    """ms per call, 20 calls back to back (GPU time), the median of 5 such runs."""
    return sorted(cuda_time(fn, warmup=1, iters=20, back_to_back=True) for _ in range(5))[2]


def _peak_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _stack(experts, out, inner, quant_type):
    import bitsandbytes.functional as bnbf

    w = torch.randn(experts * out, inner, device="cuda", dtype=torch.bfloat16) / inner ** 0.5
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    return packed.view(-1), state.absmax.float().contiguous(), [experts, out, inner]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--json")
    args = parser.parse_args()
    experts, top_k, hidden, inter = 128, 8, 2048, 768
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    stacks = {("gate_up", "nf4"): _stack(experts, 2 * inter, hidden, "nf4"),
              ("down", "nf4"): _stack(experts, hidden, inter, "nf4"),
              ("gate_up", "fp4"): _stack(experts, 2 * inter, hidden, "fp4")}
    for tokens in args.tokens:
        ids = torch.randn(tokens, experts, device="cuda").topk(top_k, dim=-1).indices.flatten()
        offs = torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)
        rows = ids.numel()
        for (name, quant_type), (packed, absmax, shape) in stacks.items():
            for transposed in (False, True):
                if quant_type == "fp4" and transposed:
                    continue
                width = shape[1] if transposed else shape[2]
                x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
                weights = op._dequantized(packed, absmax, shape, 64, quant_type, torch.bfloat16)
                b = weights if transposed else weights.transpose(-2, -1)

                def replaced():
                    w = op._dequantized(packed, absmax, shape, 64, quant_type, torch.bfloat16)
                    return torch._grouped_mm(x, w if transposed else w.transpose(-2, -1), offs=offs)

                ref = torch._grouped_mm(x, b, offs=offs)
                run = {"tokens": tokens, "projection": name, "quant_type": quant_type, "transposed": transposed,
                       "dequantize_then_grouped_mm_ms": _time_ms(replaced),
                       "grouped_mm_bf16_weights_ms": _time_ms(lambda: torch._grouped_mm(x, b, offs=offs)),
                       "dequantize_then_grouped_mm_peak_mb": _peak_mb(replaced), "configs": []}
                del weights, b
                for config in CONFIGS:
                    for chunk_mb in CHUNK_MB if config == op.CONFIG else CHUNK_MB[:1]:
                        def fused():
                            return op._grouped_mm_4bit(x, packed, absmax, offs, shape, 64, quant_type, transposed,
                                                       config, chunk_mb * 2**20)
                        try:
                            entry = {"config": config, "chunk_mb": chunk_mb, "rel_err": _rel_err(fused(), ref),
                                     "ms": _time_ms(fused)}
                        except Exception as e:  # triton.runtime.errors.OutOfResources: too much shared memory
                            print(f"{config}: {type(e).__name__}", flush=True)
                            continue
                        entry["peak_mb"] = _peak_mb(fused)
                        run["configs"].append(entry)
                run["best"] = min(run["configs"], key=lambda c: c["ms"])
                run["default"] = next(c for c in run["configs"]
                                      if tuple(c["config"]) == op.CONFIG and c["chunk_mb"] == CHUNK_MB[0])
                results["runs"].append(run)
                summary = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items()
                           if k not in ("configs", "best", "default")}
                summary["configs"] = [(c["config"], c["chunk_mb"], round(c["ms"], 3), round(c["peak_mb"]),
                                       f"{c['rel_err']:.1e}") for c in run["configs"]]
                print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

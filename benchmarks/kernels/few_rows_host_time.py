"""Host time of one grouped GEMM call at few rows per expert (Qwen3-30B-A3B gate+up, 512 tokens) on a GPU: where the
Triton path of graph_moe::grouped_mm_few_rows spends it. Without CUDA graphs that path made the layer slower than the
same op calling CUTLASS (benchmarks/kernels/few_rows_layer_ab.py). On an H200 (torch 2.11;
benchmarks/records/h200_torch2.11_few_rows_host_time.txt): torch._grouped_mm 20.1 us, the op through CUTLASS 31.5,
through Triton 66.0, run_groups alone 30.5: 35 us more per call, paid several times per step by a host-bound layer.

    python benchmarks/kernels/few_rows_host_time.py

Host issue time (no sync inside the timed calls) per call, median of 5 runs of 200 calls: torch._grouped_mm alone; the
op calling CUTLASS; the op's Triton path; run_groups (the launch helper) alone; then a cProfile of the Triton path.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from graph_moe.kernels import grouped_mm_few_rows as few
from graph_moe.kernels.triton_grouped_mm import run_groups


def _host_us(fn, calls=200):
    runs = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(runs)[2]


def main():
    experts, top_k, hidden, inter, tokens = 128, 8, 2048, 768, 512
    torch.manual_seed(0)
    ids = torch.randn(tokens, experts, device="cuda").topk(top_k, dim=-1).indices.flatten()
    offs = torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)
    b = (torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5).transpose(-2, -1)
    x = torch.randn(ids.numel(), hidden, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.graph_moe.grouped_mm_few_rows.default
    config = few.config_for(x, b)
    y = torch.empty(x.shape[0], b.shape[-1], device="cuda", dtype=torch.bfloat16)
    triton_configs = few.CONFIGS
    results = {"torch._grouped_mm": lambda: torch._grouped_mm(x, b, offs=offs),
               "op, CUTLASS path": lambda: op(x, b, offs),
               "op, Triton path": lambda: op(x, b, offs),
               "run_groups alone": lambda: run_groups(x, b, offs, y, 0, experts, config, few.PROGRAMS_PER_SM)}
    for name, fn in results.items():
        few.CONFIGS = () if name == "op, CUTLASS path" else triton_configs
        fn()
        print(f"{name}: {_host_us(fn):.1f} us host per call", flush=True)
    few.CONFIGS = triton_configs
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        op(x, b, offs)
    torch.cuda.synchronize()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue())


if __name__ == "__main__":
    main()

"""Host time against GPU time of one MoE layer (Qwen3-30B-A3B shape): graph_moe (frozen experts) and v5-style compiled.

    python benchmarks/diagnostics/layer_host_time.py --tokens 4096

For forward and forward+backward: the host's time to issue one step (no sync), the step's wall time with a sync
(what `graph-moe bench` measures), the issue time with guards skipped (unsafe: only to see what the guards cost),
then a CPU profile of 10 forward+backward steps (where the host time goes).
"""

import argparse
import time

import torch

from graph_moe.tools.bench_layer import benchmark_block, graph_moe_and_peer, layer_step


def median_ms(times):
    return sorted(times)[len(times) // 2] * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    block = benchmark_block()
    fns = graph_moe_and_peer(block)
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    for name, fn in fns.items():
        for backward in (False, True):
            step = layer_step(fn, x, g, backward)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            issue, wall, unguarded = [], [], []
            for _ in range(20):
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                issue.append(t1 - t0), wall.append(time.perf_counter() - t0)
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                for _ in range(20):
                    t0 = time.perf_counter()
                    step()
                    unguarded.append(time.perf_counter() - t0)
                    torch.cuda.synchronize()
            print(f"{name} {'fwd_bwd' if backward else 'fwd'} {args.tokens}: host issue {median_ms(issue):.3f} ms, "
                  f"wall {median_ms(wall):.3f} ms, host without guards {median_ms(unguarded):.3f} ms", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"=== {name} fwd+bwd x10, CPU self time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))


if __name__ == "__main__":
    main()

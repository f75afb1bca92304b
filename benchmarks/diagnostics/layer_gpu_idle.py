"""Where does a back-to-back step wait? GPU busy time against wall time of one MoE layer (Qwen3-30B-A3B shape).

    python benchmarks/diagnostics/layer_gpu_idle.py --tokens 4096 --trace-dir /tmp/traces

For graph_moe (frozen experts) and v5-style compiled, forward and forward+backward: the wall time per step of
N steps issued back to back (N = 5, 20, 50), the GPU's kernel time per step (torch.profiler), and the gaps
between kernels over 5 profiled back-to-back steps: where the GPU waited for the host, with the host op that
was running when each long gap began. `--trace-dir` writes the Chrome traces too.
"""

import argparse
import json
import os

import torch

from graph_moe.tools.bench_layer import cuda_time, benchmark_block, graph_moe_and_peer, layer_step


def gaps(trace_path, steps, min_gap_us=10.0):
    """Kernel time, span and the long idle gaps of the GPU in a Chrome trace, with the host ops running then."""
    events = json.load(open(trace_path))["traceEvents"]
    on_gpu = ("kernel", "gpu_memcpy", "gpu_memset")
    kernels = sorted((e for e in events if e.get("cat") in on_gpu), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    busy = sum(k["dur"] for k in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    found = []
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for k in kernels[1:]:
        if k["ts"] - end >= min_gap_us:
            # the innermost host ops running when the GPU went idle
            running = sorted((h for h in host if h["ts"] <= end <= h["ts"] + h["dur"]), key=lambda h: h["dur"])
            found.append({"gap_us": round(k["ts"] - end, 1), "next_kernel": k["name"][:80],
                          "host_ops": [h["name"][:80] for h in running[:4]]})
        end = max(end, k["ts"] + k["dur"])
    return {"kernel_ms_per_step": busy / steps / 1e3, "span_ms_per_step": span / steps / 1e3,
            "idle_ms_per_step": (span - busy) / steps / 1e3, "gaps": sorted(found, key=lambda g: -g["gap_us"])[:25]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args()
    block = benchmark_block()
    fns = graph_moe_and_peer(block)
    results = []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        for name, fn in fns.items():
            for backward in (False, True):
                step = layer_step(fn, x, g, backward)
                row = {"variant": name, "tokens": tokens, "step": "fwd_bwd" if backward else "fwd"}
                for iters in (5, 20, 50):
                    row[f"back_to_back_{iters}_ms"] = cuda_time(step, iters=iters, back_to_back=True)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
                path = os.path.join(args.trace_dir or "/tmp", f"trace_{name}_{row['step']}_{tokens}.json")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                prof.export_chrome_trace(path)
                row.update(gaps(path, 5))
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "gaps"}), flush=True)
                for gap in row["gaps"][:8]:
                    print("   ", gap, flush=True)
    if args.json:
        json.dump([{"card": torch.cuda.get_device_name(), "torch": torch.__version__}] + results, open(args.json, "w"),
                  indent=1)


if __name__ == "__main__":
    main()

"""`graph-moe bench memory`: peak GPU memory of one MoE layer's forward+backward, and what is alive at the peak.

    graph-moe bench memory --variants graph_moe_frozen hf_loop_frozen graph_moe_lora hf_loop_lora --tokens 16384
    graph-moe bench memory --variants graph_moe_qlora graph_moe_qlora_whole_stacks hf_loop_qlora --tokens 4096

For each variant: the transient peak (max allocated during a forward+backward minus what was allocated before it,
so resident weights of other variants do not count), and with `--snapshot` the largest blocks alive at the peak with
the Python frames that allocated them (torch.cuda.memory._record_memory_history).

`--mode reduce-overhead` compiles the graph_moe variants with CUDA graphs. A replayed graph allocates nothing (its
intermediates live in the graph's private memory pool, allocated when it was recorded), so the transient peak of a
replay undercounts it. Each variant also reports the private pools' segments (`graph_pools_gb`: the CUDA graphs'
memory), and what the allocator holds beyond the live tensors after the step (reserved - allocated, the cache emptied
before the variant was built): for a CUDA-graph variant its pools and the blocks cached by the compile and the graphs'
warm-up; for an eager variant its cache, at least its transient peak and more where its allocations fragment the
cache (the HF loop's: 3.9 GB against a 0.74 GB peak).

    graph-moe bench memory --variants graph_moe_qlora hf_loop_qlora --mode reduce-overhead

(`graph-moe bench layer` records a peak too, `<variant>_peak_gb`: with every variant's weights resident.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from graph_moe.passes import RewriteSettings
from graph_moe.tools.bench_layer import SHAPES, benchmark_block, block_variant, graph_moe_block
from graph_moe.tools.bench_record import run_facts

log = logging.getLogger("graph_moe")
# graph_moe compiled or the HF loop eager, on frozen bf16 experts, LoRA r=16 on them, or NF4 experts + LoRA (QLoRA);
# `_whole_stacks`: graph_moe with low_memory_4bit=False
VARIANTS = [f"{way}_{kind}" for kind in ("frozen", "lora", "qlora") for way in ("graph_moe", "hf_loop")]
VARIANTS.append("graph_moe_qlora_whole_stacks")


def make_variant(name, block, mode=None):
    """hf_loop_{frozen,lora,qlora} or graph_moe_{frozen,lora,qlora}, with `_whole_stacks`: low_memory_4bit=False."""
    low_memory = not name.endswith("_whole_stacks")
    name = name.removesuffix("_whole_stacks")
    module = block_variant(name.rsplit("_", 1)[-1] if name.endswith("lora") else "frozen", block)
    if name.startswith("hf_loop"):
        return (lambda x: module(x)[0]), module
    fn = graph_moe_block(module, mode=mode, settings=RewriteSettings(low_memory_4bit=low_memory))
    return fn, fn.module


def graph_pools_gb() -> float:
    """Bytes of the allocator's segments in private pools (CUDA graphs' memory), from a snapshot of its segments."""
    segments = torch.cuda.memory._snapshot()["segments"]
    return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)) / 1e9


def live_at_peak(snapshot, top=12):
    """Replay the allocator trace; the largest blocks alive when the allocated total peaked."""
    live, total, best, best_live = {}, 0, 0, {}
    for event in snapshot["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] in ("free_requested",) and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > best:
            best, best_live = total, dict(live)
    rows = []
    for event in sorted(best_live.values(), key=lambda e: -e["size"])[:top]:
        frames = [f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in event.get("frames", [])
                  if f["filename"].endswith(".py") and "torch/utils" not in f["filename"]][:4]
        rows.append({"mb": round(event["size"] / 1e6, 1), "frames": frames})
    return {"traced_peak_gb": best / 1e9, "largest_live": rows}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   default=["graph_moe_qlora", "graph_moe_qlora_whole_stacks", "hf_loop_qlora"])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--snapshot", action="store_true", help="also list the largest blocks alive at the peak")
    p.add_argument("--mode", default=None, help="torch.compile mode of the graph_moe variants (reduce-overhead)")
    p.add_argument("--json", default="bench_memory.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the benchmark needs a CUDA GPU")
    block = benchmark_block(args.shape)
    results = {**run_facts("memory", argv, "cuda"), "shape": args.shape, "tokens": args.tokens, "mode": args.mode}
    for name in args.variants:
        torch.cuda.empty_cache()
        fn, module = make_variant(name, block, args.mode)
        trainable = [q for q in module.parameters() if q.requires_grad]
        x = torch.randn(1, args.tokens, SHAPES[args.shape][2], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)

        def step():
            x.grad = None
            for q in trainable:
                q.grad = None
            fn(x).backward(grad)

        for _ in range(3):
            step()
        x.grad = None
        for q in trainable:
            q.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        if args.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200000)
        step()
        torch.cuda.synchronize()
        row = {"transient_peak_gb": (torch.cuda.max_memory_allocated() - before) / 1e9,
               "held_beyond_live_gb": (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 1e9,
               "graph_pools_gb": graph_pools_gb()}
        if args.snapshot:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            row.update(live_at_peak(snap))
        results[name] = row
        log.info("%s %s", name, json.dumps(row))
        fn = module = None  # free this variant before the next
        torch.cuda.empty_cache()
        with open(args.json, "w") as f:  # kept after every variant: a run stopped early keeps what it measured
            json.dump(results, f, indent=1)
    print(table(results, args.variants))
    return 0


def table(results: dict, variants: list[str]) -> str:
    lines = [f"{results['card']}, torch {results['torch']}; {results['shape']}, {results['tokens']} tokens, "
             f"mode {results['mode']}; GB",
             "| variant | transient peak of forward+backward | CUDA graph pools | held beyond live tensors |",
             "|---|---|---|---|"]
    for name in variants:
        r = results[name]
        lines.append(f"| {name} | {r['transient_peak_gb']:.2f} | {r['graph_pools_gb']:.2f} | "
                     f"{r['held_beyond_live_gb']:.2f} |")
    return "\n".join(lines)

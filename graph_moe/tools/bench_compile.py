"""`graph-moe bench compile`: compile time of a training step (forward + backward), caches off, graph_moe
against Inductor on the unrolled expert loop and against the same model with dense MLPs; then the graphs compiled
over new sequence lengths. compile_s = first step - second step (same shapes), after one small compile that pays the
process's own start-up (Inductor's compile workers, imports, the CUDA context) so that no variant carries it.

    graph-moe bench compile                                  # 1 and 4 layers, Qwen3-30B-A3B layer shape
    graph-moe bench compile --layers 24 --variants graph_moe dense --frozen-mlp

Variants (each on a fresh model in a fresh process unless --same-process, Inductor's caches off):
- graph_moe: `graph_moe.compile(model)`: install, regional compile of each decoder layer; frozen experts (laid out)
  traced as expert 0's body alone, which the pass groups over all E before Inductor sees it (passes/traced_once.py).
- graph_moe_every_body: the same with `trace_experts_once=False`: Dynamo traces all E bodies, the pass proves them
  (what `graph_moe.backend` does; graph_moe.compile traces expert 0's body alone when the experts are laid out).
- graph_moe_stacked: the same with `stack_experts=True` (expert weights as two stacked parameters: trained
  experts need no per-forward stack, which Inductor compiles as one copy kernel per expert weight).
- unrolled: the same installed range loop, each decoder layer compiled by plain Inductor (no pass): what
  compiling the loop costs without graph_moe.
- dense: the same Qwen3-MoE config with every layer a dense MLP (`mlp_only_layers`), compiled per layer.
- backend: `graph_moe.install` and the whole model compiled as one graph with `graph_moe.backend` (README's second
  way; also what accelerate's whole-model dynamo plugin does): Dynamo traces every layer's loop, body by body.
- backend_shared: the same with `install(model, shared_block_trace=True)`: the MoE blocks of one kind traced once
  (graph_moe/shared_trace.py).

Works on the CPU (Inductor's C++ backend) and the GPU; compile time is mostly Dynamo tracing and Inductor's
work per node, so it depends on the number of experts far more than on the tensor sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import torch

import graph_moe
from graph_moe.tools.bench_record import run_facts
from graph_moe.tools.model_zoo import make_config

log = logging.getLogger("graph_moe")


def build(args, layers: int, dense: bool):
    import transformers as tf

    extra = {"mlp_only_layers": list(range(layers))} if dense else {}
    config = make_config("qwen3_moe", layers=layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                         intermediate=args.intermediate, vocab=args.vocab, **extra)
    torch.manual_seed(0)
    with torch.device(args.device):  # random init on the device: 24 layers of 128 experts take minutes on a CPU
        model = tf.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    if args.frozen_mlp:  # as under LoRA: no weight gradients for the MLPs (and no second copy of them in memory)
        for layer in model.model.layers:
            layer.mlp.requires_grad_(False)
    return model


def first_step_seconds(model, args, tokens=None) -> float:
    ids = torch.randint(0, args.vocab, (1, tokens or args.tokens), device=args.device)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def warm_up_process(args) -> float:
    """Pay what the first compile in a process pays whatever the model, before any variant is timed: Inductor's
    compile workers starting, its modules importing, the CUDA context (on the CPU: probing the vector ISA by compiling
    C++). Left in, it went to whichever variant ran first (graph_moe by default): 6-7 s on the H200's host."""
    start = time.perf_counter()
    x = torch.randn(64, 64, device=args.device, requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum(), backend=args.inner)(x).backward()
    torch._dynamo.reset()
    return time.perf_counter() - start


def run(variant: str, layers: int, args) -> dict:
    torch._dynamo.reset()
    graph_moe.report.reset_counters()
    model = build(args, layers, dense=variant == "dense")
    if variant.startswith("graph_moe"):
        graph_moe.compile(model, inner=args.inner, stack_experts=variant == "graph_moe_stacked",
                          trace_experts_once=variant != "graph_moe_every_body")
    elif variant.startswith("backend"):
        graph_moe.install(model, shared_block_trace=variant == "backend_shared")
        model.compile(backend=graph_moe.make_backend(args.inner))
    elif variant == "unrolled":
        graph_moe.install(model)
        for layer in model.model.layers:  # the range loop traced into one graph, Inductor on all E bodies
            layer.compile(backend=args.inner)
    else:
        for layer in model.model.layers:
            layer.compile(backend=args.inner)
    # graph_moe traces without the fake-tensor cache and turns it on for Inductor (compile.py); plain Inductor on
    # the unrolled bodies gets it throughout, as it would under torch.compile's defaults.
    cache = dict(fake_tensor_cache_enabled=True) if variant == "unrolled" else {}
    timings = torch._dynamo.utils.compilation_time_metrics
    timings.clear()
    with graph_moe.capture_settings(), torch._dynamo.config.patch(**cache):
        first = first_step_seconds(model, args)
        # where the first compile went (torch's dynamo_timed phases: Dynamo's trace, Inductor's codegen and kernel
        # compiles, the backward's compile), summed per phase; the longest single call of each beside it
        phases = {name: [round(sum(t), 3), round(max(t), 3)] for name, t in timings.items() if t and sum(t) >= 0.05}
        second = first_step_seconds(model, args)  # the same shapes: no compile, the step itself
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        lengths = [args.tokens + 8 * (i + 1) + i for i in range(args.lengths)]
        length_steps = [first_step_seconds(model, args, n) for n in lengths]
    result = {"variant": variant, "first_step_s": first, "second_step_s": second, "compile_s": first - second,
              **graph_moe.counter_snapshot(), "first_compile_phases_s_total_max": phases}
    if lengths:  # one more compile (dynamic shapes) on the first new length, then none
        result.update(lengths=lengths, length_steps_s=length_steps,
                      graphs_compiled_over_lengths=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs)
    return result


def table(header: dict, results: list[dict]) -> str:
    lines = [f"{header['card']}, torch {header['torch']}; seconds; compile = first step - second step (after "
             f"a warm-up of the process: {header['process_warm_up_s']:.1f} s)",
             "| layers | variant | compile | step after | graphs compiled over new lengths |", "|---|---|---|---|---|"]
    for r in results:
        over = r.get("graphs_compiled_over_lengths", "-")
        lines.append(f"| {r['layers']} | {r['variant']} | {r['compile_s']:.1f} | {r['second_step_s']:.3f} | {over} |")
    return "\n".join(lines)


def _each_in_a_fresh_process(args, runs, tqdm, facts: dict) -> int:
    """Run `graph-moe bench compile` once per (layers, variant), each in its own process, and merge the JSON."""
    options = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
               if name not in ("json", "variants", "layers", "same_process", "frozen_mlp")]
    options += ["--frozen-mlp"] if args.frozen_mlp else []
    header, results = None, []
    with tempfile.TemporaryDirectory() as tmp:
        for layers, variant in tqdm(runs, desc="compile time (a process each)", unit="model"):
            out = os.path.join(tmp, "run.json")
            command = [sys.executable, "-m", "graph_moe", "bench", "compile", *options, "--variants", variant,
                       "--layers", str(layers), "--json", out]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                child_header, row = json.load(f)
            # the children's facts but this command's line
            header = header or {**{k: v for k, v in child_header.items() if k != "process_warm_up_s"}, **facts}
            results.append({**row, "process_warm_up_s": child_header["process_warm_up_s"]})
            log.info("%s", json.dumps(results[-1]))
            with open(args.json, "w") as f:
                json.dump([{**header, "each_in_a_fresh_process": True}] + results, f, indent=1)
    print(table({**header, "process_warm_up_s": max(r["process_warm_up_s"] for r in results)}, results))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["graph_moe", "unrolled", "dense"],
                   choices=["graph_moe", "graph_moe_every_body", "graph_moe_stacked", "backend", "backend_shared",
                            "unrolled", "dense"])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4], help="decoder layer counts, one model each")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--frozen-mlp", action="store_true", help="no weight gradients for the MLPs (LoRA-like)")
    p.add_argument("--lengths", type=int, default=8, help="then N more steps at new sequence lengths (recompiles)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inner", default="inductor", help="the compiler after Dynamo (and the pass): inductor, or aot_eager "
                   "to time Dynamo and the pass alone")
    p.add_argument("--json", default="bench_compile_time.json")
    p.add_argument("--same-process", action="store_true",
                   help="time every model in this process (by default each runs in a fresh one: a compile leaves "
                   "imports, kernels and caches warm for the next)")
    args = p.parse_args(argv)
    from tqdm import tqdm

    runs = [(layers, variant) for layers in args.layers for variant in args.variants]
    if len(runs) > 1 and not args.same_process:
        return _each_in_a_fresh_process(args, runs, tqdm, run_facts("compile", argv, args.device))
    torch.compiler.config.force_disable_caches = True
    torch._dynamo.config.recompile_limit = 64
    header = {**{k: v for k, v in vars(args).items() if k not in ("json", "variants", "layers", "same_process")},
              **run_facts("compile", argv, args.device),
              "process_warm_up_s": warm_up_process(args)}
    results = []
    for layers, variant in tqdm(runs, desc="compile time", unit="model"):
        results.append({"layers": layers, **run(variant, layers, args)})
        log.info("%s", json.dumps(results[-1]))
        with open(args.json, "w") as f:  # kept after every model: a long run stopped early keeps what it measured
            json.dump([header] + results, f, indent=1)
    print(table(header, results))
    return 0

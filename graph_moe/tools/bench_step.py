"""`graph-moe bench step`: a whole model's training step. A Qwen3-30B-A3B-shaped model compiled whole
(`torch.compile(model, backend=graph_moe.backend)`, as accelerate's whole-model dynamo plugin does), with and without
`install(model, shared_block_trace=True)`, against `graph_moe.compile` and eager: the first step's time (compile),
the training step after it, and the loss and gradients against eager. Steps are timed once a step compiles nothing
new (at most 6 untimed warm-up steps: a peer that graph-breaks or recompiles keeps compiling after its first step);
the record says how many graphs were compiled after the first step and while timed.

    graph-moe bench step --layers 4 --tokens 2048 --experts lora --json out.json
    graph-moe bench step --variants graph_moe backend --qwen3-attention --bf16-adapters

Each variant runs on its own copy of one model (random weights, bf16, on the GPU), Inductor's caches off. Experts are
frozen (`--experts frozen`) or carry PEFT LoRA r=16 on gate/up/down (`lora`; PEFT's float32 adapters unless
`--bf16-adapters`), the rest of the model frozen as under
LoRA; gradients compared are the trainable parameters'.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import time
import sys
from unittest import mock

import torch

import graph_moe
from graph_moe import layout_check
from graph_moe.stacked_adapters import split_stacked
from graph_moe.tools.bench_record import failed, failed_run, run_facts
from graph_moe.tools.model_zoo import add_shape_arguments, expert_lora_targets, shape_config
from graph_moe.tools.routing import KINDS, skew_routing

log = logging.getLogger("graph_moe")


def build_model(args, ids):
    """The benchmark's model, on `args.device` in bf16, from the options of `graph-moe bench step`; its routers set
    so that `ids` are routed as `--routing` says (the shares reached in `args.routing_reached`)."""
    import transformers as tf

    config = shape_config(args)
    if args.qwen3_attention:  # Qwen3-30B-A3B's attention (make_config's 4 heads of hidden / 4 suit tiny models)
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 32, 4, 128
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    args.routing_reached = skew_routing(model, ids, args.routing)
    if args.experts == "full":  # full fine-tuning: every parameter trains
        return model
    model.requires_grad_(False)
    if args.experts == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, init_lora_weights=False, **expert_lora_targets()),
                               autocast_adapter_dtype=not args.bf16_adapters)
        if args.four_bit_experts:  # QLoRA on 5.x: the 3D experts in NF4 under the adapters
            graph_moe.quantize_experts_4bit(model)
    else:  # frozen experts: train the attention projections, as a LoRA elsewhere would
        for layer in model.model.layers:
            layer.self_attn.requires_grad_(True)
    return model


def train_step(model, ids, optimizer=None):
    """One forward+backward on `ids` as labels, then the optimizer's step; the loss, after the GPU finished."""
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
    if out.loss.is_cuda:
        torch.cuda.synchronize()
    return out.loss.detach().float()


MAX_WARMUP_STEPS = 6


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process since the last reset."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def make_optimizer(model, args):
    """AdamW over the trainable parameters (fused on the GPU), or None with --no-optimizer."""
    if args.no_optimizer:
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=1e-6, fused=args.device == "cuda")


def grads(model):
    """Per-parameter gradients, graph_moe's stacked adapters split back into PEFT's per-expert names."""
    return split_stacked({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="graph-moe bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(p)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--experts", choices=["frozen", "lora", "full"], default="lora",
                   help="frozen experts (attention trained), PEFT LoRA r=16 on the experts, or full fine-tuning")
    p.add_argument("--four-bit-experts", action="store_true",
                   help="with --experts lora on transformers 5.x: the 3D experts held in NF4 "
                        "(graph_moe.quantize_experts_4bit); only graph_moe's variants run them")
    p.add_argument("--routing", choices=KINDS, default="uniform",
                   help="expert popularity: uniform (random routers), zipf (share of expert r ~ 1/sqrt(r)) or hot "
                        "(one expert picked by 30%% of the tokens); graph_moe/tools/routing.py sets the routers")
    p.add_argument("--no-optimizer", action="store_true",
                   help="time forward+backward only (by default the step includes AdamW's step)")
    p.add_argument("--qwen3-attention", action="store_true",
                   help="Qwen3-30B-A3B's attention: 32 heads, 4 KV heads, head_dim 128 (without it: 4 heads of "
                        "hidden / 4)")
    p.add_argument("--bf16-adapters", action="store_true",
                   help="LoRA adapters in the model's bf16 (PEFT's default keeps them in float32)")
    p.add_argument("--variants", nargs="+", default=["backend", "backend_shared", "graph_moe"],
                   choices=["backend", "backend_shared", "backend_dynamo_guards", "graph_moe",
                            "graph_moe_dynamo_guards", "torch_compile", "eager"],
                   help="eager: the model as loaded, not compiled (transformers 4.x: the HF expert loop); "
                        "torch_compile: plain torch.compile(model) of the model as loaded (transformers 5.x: its own "
                        "grouped_mm experts), the peer; backend: graph_moe.backend on the whole model; "
                        "backend_shared: the same after "
                        "install(shared_block_trace=True); graph_moe: graph_moe.compile (a region per decoder layer); "
                        "*_dynamo_guards: the layout's per-expert facts guarded by Dynamo instead of checked in plain "
                        "Python around each call (graph_moe/layout_check.py switched off): what that check saves")
    p.add_argument("--inner", default="inductor", help="the compiler after the pass: inductor, or aot_eager / eager "
                   "(quick runs on the CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the first; the median is reported")
    p.add_argument("--profile", help="write a torch.profiler table of two steps per variant into this folder")
    p.add_argument("--json", default="bench_step.json")
    args = p.parse_args(argv)
    torch.compiler.config.force_disable_caches = True
    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.tokens), device=args.device)
    base = build_model(args, ids)
    eager = copy.deepcopy(base)
    if args.four_bit_experts:  # the 4-bit experts run graph_moe's forward only: eagerly here
        graph_moe.install(eager)
    reference_loss = train_step(eager, ids)
    reference = grads(eager)
    results = {**run_facts("step", argv, args.device), "layers": args.layers, "tokens": args.tokens,
               "num_experts": args.num_experts, "experts": args.experts,
               "adapters": "bf16" if args.bf16_adapters else "float32", "four_bit_experts": args.four_bit_experts,
               "routing": args.routing, "routing_reached": args.routing_reached,
               "optimizer": None if args.no_optimizer else "AdamW", "eager_loss": reference_loss.item(), "runs": []}
    del eager
    for variant in args.variants:
        try:
            run = measure(variant, base, ids, reference, args)
        except Exception as error:  # noqa: BLE001  (recorded; the other variants still run)
            run = failed_run(variant, error)
        results["runs"].append(run)
        log.info("%s", json.dumps(run))
        with open(args.json, "w") as f:  # kept after every variant: a run stopped early keeps what it measured
            json.dump(results, f, indent=1)
    print(table(results))
    return int(failed(results))


def measure(variant: str, base, ids, reference: dict, args) -> dict:
    """One variant's run on its own copy of `base`: first step, median step, peak memory, loss and gradients against
    eager's (`reference`)."""
    torch._dynamo.reset()
    graph_moe.report.reset_counters()
    patches = contextlib.ExitStack()  # patches applied now, undone after the variant
    if variant.endswith("_dynamo_guards"):  # no plain-Python layout check: the traced forward guards the facts
        patches.enter_context(mock.patch.object(layout_check, "verify", lambda block: False))
        patches.enter_context(mock.patch.object(layout_check, "watch", lambda model: None))
    before = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = copy.deepcopy(base)
    if variant == "eager":
        call = model
    elif variant == "torch_compile":
        call = torch.compile(model)
    elif variant.startswith("graph_moe"):
        graph_moe.compile(model, inner=args.inner)
        call = model
    else:
        graph_moe.install(model, shared_block_trace=variant == "backend_shared")
        call = torch.compile(model, backend=graph_moe.make_backend(args.inner))
    if variant.startswith("backend"):  # a whole model under graph_moe.backend: traced as graph_moe.compile traces
        patches.enter_context(graph_moe.capture_settings())  # (it applies these around each region call itself);
    start = time.perf_counter()  # the peers compile with Dynamo's defaults, as their users run them
    with patches:
        loss = train_step(call, ids)
        first = time.perf_counter() - start
        got = grads(model)
        optimizer = make_optimizer(model, args)
        if optimizer is not None:
            optimizer.step()
        errors = {n: ((got[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in reference.items()}
        graphs = compiled_graphs()
        warmup, start = 0, time.perf_counter()  # untimed steps until one compiles nothing new (a peer that
        while warmup < MAX_WARMUP_STEPS:  # recompiles, or graph-breaks into regions first compiled on the second call)
            before_step = compiled_graphs()
            model.zero_grad(set_to_none=True)
            train_step(call, ids, optimizer)
            warmup += 1
            if compiled_graphs() == before_step:
                break
        warmup_s, timed_from = time.perf_counter() - start, compiled_graphs()
        times = []
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            train_step(call, ids, optimizer)
            times.append(time.perf_counter() - start)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            with torch.profiler.profile() as prof:
                for _ in range(2):
                    model.zero_grad(set_to_none=True)
                    train_step(call, ids, optimizer)
            with open(os.path.join(args.profile, f"{variant}.txt"), "w") as f:
                for key in ("self_cuda_time_total", "self_cpu_time_total"):
                    f.write(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
    run = {"variant": variant, "first_step_s": first, "step_ms": 1e3 * sorted(times)[len(times) // 2],
           # the variant's own peak: its copy of the model, activations, gradients (the shared base excluded)
           "peak_memory_gb": (torch.cuda.max_memory_allocated() - before) / 1e9 if args.device == "cuda" else None,
           "loss": loss.item(), "grads_compared": len(errors), "missing_grads": sorted(set(reference) - set(got)),
           "graphs_compiled_after_first_step": compiled_graphs() - graphs, "warmup_steps": warmup,
           "warmup_s": warmup_s,
           "graphs_compiled_while_timed": compiled_graphs() - timed_from,
           "max_grad_rel_err": max(errors.values()),
           # the five worst: (name, relative error, eager's gradient norm)
           "worst_grads": [(n, errors[n], reference[n].norm().item())
                           for n in sorted(errors, key=errors.get)[-5:]],
           "median_grad_rel_err": sorted(errors.values())[len(errors) // 2],
           **graph_moe.counter_snapshot()}
    return run


def table(results: dict) -> str:
    lines = [f"{results['card']}, torch {results['torch']}; {results['layers']} layers, {results['tokens']} tokens, "
             f"{results['num_experts']} experts ({results['experts']}, {results['adapters']} adapters if LoRA), "
             f"{results.get('routing', 'uniform')} routing, optimizer {results.get('optimizer')}; "
             f"eager loss {results['eager_loss']:.5f}",
             "| variant | first step (compile), s | step, ms | peak GB | loss | median grad rel. error | "
             "graphs after step 1 (while timed) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].splitlines()[0][:100]} | | | | | |")
            continue
        peak = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
        lines.append(f"| {r['variant']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | {peak} | {r['loss']:.5f} | "
                     f"{r['median_grad_rel_err']:.3g} | {r['graphs_compiled_after_first_step']} "
                     f"({r.get('graphs_compiled_while_timed', '-')}) |")
    return "\n".join(lines)

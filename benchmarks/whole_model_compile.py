"""A Qwen3-30B-A3B-shaped model compiled whole (`torch.compile(model, backend=graph_moe.backend)`, as the HF Trainer's
`torch_compile` does), with and without `install(model, shared_block_trace=True)`, against `graph_moe.compile` and
eager: the first step's time (compile), the training step after it, and the loss and gradients against eager.

    python benchmarks/whole_model_compile.py --layers 4 --tokens 2048 --experts lora --json out.json

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
import os
import time
from unittest import mock

import torch

import graph_moe
from graph_moe import layout_check
from graph_moe.layout import _TENSOR_GUARD_SHORTCUTS
from graph_moe.model_zoo import make_config
from graph_moe.stacked_adapters import split_stacked


def build(args):
    import transformers as tf

    config = make_config("qwen3_moe", layers=args.layers, experts=args.num_experts, top_k=8, hidden=args.hidden,
                         intermediate=args.intermediate, vocab=args.vocab)
    if args.qwen3_attention:  # Qwen3-30B-A3B's attention (make_config's 4 heads of hidden / 4 suit tiny models)
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 32, 4, 128
    torch.manual_seed(0)
    with torch.device(args.device):
        model = tf.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.requires_grad_(False)
    if args.experts == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                 init_lora_weights=False),
                               autocast_adapter_dtype=not args.bf16_adapters)
    else:  # frozen experts: train the attention projections, as a LoRA elsewhere would
        for layer in model.model.layers:
            layer.self_attn.requires_grad_(True)
    return model


def step(model, ids):
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    if out.loss.is_cuda:
        torch.cuda.synchronize()
    return out.loss.detach().float()


def grads(model):
    """Per-parameter gradients, graph_moe's stacked adapters split back into PEFT's per-expert names."""
    return split_stacked({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--experts", choices=["frozen", "lora"], default="lora")
    p.add_argument("--qwen3-attention", action="store_true",
                   help="32 heads, 4 KV heads, head_dim 128 (session 16's runs had 4 heads of 512)")
    p.add_argument("--bf16-adapters", action="store_true",
                   help="LoRA adapters in the model's bf16 (PEFT's default keeps them in float32)")
    p.add_argument("--variants", nargs="+", default=["backend", "backend_shared", "graph_moe"],
                   choices=["backend", "backend_shared", "backend_dynamo_guards", "graph_moe",
                            "graph_moe_dynamo_guards", "graph_moe_torch_shortcuts"],
                   help="*_dynamo_guards: the layout's per-expert facts guarded by Dynamo instead of checked in "
                        "plain Python (graph_moe/layout_check.py; the code before session 19 for backend, before "
                        "session 18 for graph_moe); "
                        "graph_moe_torch_shortcuts: that, with torch's own guard shortcuts left as they are (the code "
                        "before session 18: on torch 2.10-2.11 it misses an expert weight unfrozen after compiling)")
    p.add_argument("--profile", help="write a torch.profiler table of two steps per variant into this folder")
    p.add_argument("--json")
    args = p.parse_args()
    torch.compiler.config.force_disable_caches = True
    base = build(args)
    ids = torch.randint(0, args.vocab, (1, args.tokens), device=args.device)
    eager = copy.deepcopy(base)
    reference_loss = step(eager, ids)
    reference = grads(eager)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "layers": args.layers,
               "tokens": args.tokens, "experts": args.experts,
               "adapters": "bf16" if args.bf16_adapters else "float32", "eager_loss": reference_loss.item(), "runs": []}
    del eager
    shortcuts = {name: getattr(torch._dynamo.config, name) for name in _TENSOR_GUARD_SHORTCUTS
                 if hasattr(torch._dynamo.config, name)}
    for variant in args.variants:
        torch._dynamo.reset()
        graph_moe.report.reset_counters()
        for name, value in shortcuts.items():
            setattr(torch._dynamo.config, name, value)  # each variant starts from torch's defaults
        patches = contextlib.ExitStack()  # patches applied now, undone after the variant
        if variant in ("backend_dynamo_guards", "graph_moe_dynamo_guards", "graph_moe_torch_shortcuts"):
            patches.enter_context(mock.patch.object(layout_check, "verify", lambda block: False))
            patches.enter_context(mock.patch.object(layout_check, "watch", lambda model: None))
        if variant == "graph_moe_torch_shortcuts":
            patches.enter_context(mock.patch("graph_moe.install.keep_tensor_guards", lambda: None))
        model = copy.deepcopy(base)
        if variant.startswith("graph_moe"):
            graph_moe.compile(model)
            call = model
        else:
            graph_moe.install(model, shared_block_trace=variant == "backend_shared")
            call = torch.compile(model, backend=graph_moe.backend)
        start = time.perf_counter()
        with graph_moe.capture_settings(), patches:
            loss = step(call, ids)
            first = time.perf_counter() - start
            got = grads(model)
            errors = {n: ((got[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in reference.items()}
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            times = []
            for _ in range(5):
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                step(call, ids)
                times.append(time.perf_counter() - start)
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                with torch.profiler.profile() as prof:
                    for _ in range(2):
                        model.zero_grad(set_to_none=True)
                        step(call, ids)
                with open(os.path.join(args.profile, f"{variant}.txt"), "w") as f:
                    for key in ("self_cuda_time_total", "self_cpu_time_total"):
                        f.write(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
        run = {"variant": variant, "first_step_s": first, "step_ms": 1e3 * sorted(times)[2],
               "loss": loss.item(), "grads_compared": len(errors), "missing_grads": sorted(set(reference) - set(got)),
               "graphs_compiled_after_first_step": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
               "max_grad_rel_err": max(errors.values()),
               # the five worst: (name, relative error, eager's gradient norm)
               "worst_grads": [(n, errors[n], reference[n].norm().item())
                               for n in sorted(errors, key=errors.get)[-5:]],
               "median_grad_rel_err": sorted(errors.values())[len(errors) // 2],
               **graph_moe.counter_snapshot()}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        del model, call
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

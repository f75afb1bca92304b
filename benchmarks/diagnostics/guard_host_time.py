"""Host time of Dynamo's cache lookup (guard evaluation) per call of a graph_moe.compile region or of a model compiled
whole, with the layout's per-expert facts checked in plain Python before each call (graph_moe/layout_check.py) or
guarded by Dynamo.

    python benchmarks/diagnostics/guard_host_time.py --experts frozen lora --ways graph_moe.compile torch.compile \
        --json out.json
    python benchmarks/diagnostics/guard_host_time.py --dynamo-guards ...   # the facts guarded by Dynamo instead

A tiny Qwen3-MoE (2 layers, 128 experts, hidden 64): the guards' cost depends on the number of experts and
adapters, not on the layer sizes. Frozen experts (attention trained) or PEFT LoRA r=4 on every expert projection;
training steps (forward + backward), the inner compiler `eager`. Reported: the first step (compile), the profiler's
"TorchDynamo Cache Lookup" time per call, and the step's wall time with guard evaluation on and skipped
(`skip_guard_eval_unsafe`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from unittest import mock

import torch

import graph_moe
from graph_moe import layout_check
from graph_moe.tools.model_zoo import make_config


def measure(experts: str, num_experts: int, device: str, way: str) -> dict:
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    config = make_config("qwen3_moe", layers=2, experts=num_experts, top_k=8, hidden=64, intermediate=32, vocab=128)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if experts == "frozen":
        for layer in model.model.layers:
            layer.self_attn.requires_grad_(True)
    else:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                 init_lora_weights=False))
    if way == "graph_moe.compile":
        call = graph_moe.compile(model, inner="eager")
    else:  # the model compiled whole, as the HF Trainer's torch_compile does
        graph_moe.install(model)
        call = torch.compile(model, backend=graph_moe.make_backend("eager"))
    ids = torch.randint(0, 128, (1, 64), device=device)

    def step():
        with graph_moe.capture_settings():
            call(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def step_ms():
        start = time.perf_counter()
        for _ in range(10):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 100

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    lookup = [e for e in prof.key_averages() if "Cache Lookup" in e.key]
    result = {"way": way, "experts": experts, "num_experts": num_experts, "first_step_s": first,
              "cache_lookup_us": lookup[0].cpu_time_total / lookup[0].count if lookup else None,
              "step_ms": sorted(step_ms() for _ in range(3))[1]}
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        result["step_ms_guards_skipped"] = sorted(step_ms() for _ in range(3))[1]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", nargs="+", choices=["frozen", "lora"], default=["frozen", "lora"])
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ways", nargs="+", choices=["graph_moe.compile", "torch.compile"], default=["graph_moe.compile"],
                   help="graph_moe.compile's regions, or torch.compile(model, backend=graph_moe's) on the whole model")
    p.add_argument("--dynamo-guards", action="store_true",
                   help="leave the layout's per-expert facts to Dynamo's guards (no plain-Python check)")
    p.add_argument("--json")
    args = p.parse_args()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "layout_check": not args.dynamo_guards, "runs": []}
    for way in args.ways:
        for experts in args.experts:
            torch._dynamo.reset()
            with contextlib.ExitStack() as patches:
                if args.dynamo_guards:
                    patches.enter_context(mock.patch.object(layout_check, "verify", lambda block: False))
                    patches.enter_context(mock.patch.object(layout_check, "watch", lambda model: None))
                run = measure(experts, args.num_experts, args.device, way)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

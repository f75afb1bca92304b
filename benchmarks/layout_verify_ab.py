"""The layout's per-expert facts checked two ways, one process, interleaved (GPU): Dynamo's guards (what
`torch.compile(backend=graph_moe.backend)` does: 3 x E modules and weights read in the traced forward, each guarded)
against `layout.verify` in plain Python before each call (what graph_moe.compile's regions do: Dynamo then guards one
flag). Session 12 tried a Python check before and reverted it: its per-expert Python loop cost more host time per
call than the guards (0.28 ms frozen on the H200's host). `verify` is one C-level pass per fact (27 us at E=128 on
a 2-core CPU); this measures whether the layer call is as fast or faster, and what each costs to compile.

    python benchmarks/layout_verify_ab.py --json layout_verify_ab.json

Qwen3-30B-A3B block (frozen experts), first call seconds, Dynamo guard count, then per token count ms per call,
waited for and back to back, forward and forward+backward (input gradient).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import graph_moe
from graph_moe.bench import ROUNDS, _cuda_time, benchmark_block, layer_step, own_code
from graph_moe.compile import TraceOnce, _WithCaptureSettings


def compiled_block(block, verified: bool):
    ours = copy.deepcopy(block)
    graph_moe.install(ours)
    compiled = torch.compile(own_code(lambda hidden: ours(hidden)[0]), backend=graph_moe.make_backend("inductor"))
    return _WithCaptureSettings(compiled, trace_once=TraceOnce(True), blocks=[ours] if verified else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--json", default="layout_verify_ab.json")
    args = parser.parse_args(argv)
    block = benchmark_block()
    variants = {"guarded": compiled_block(block, False), "verified": compiled_block(block, True)}
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for tokens in args.tokens:
        x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        row = {"tokens": tokens}
        steps = {}
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(x).backward(grad)
            torch.cuda.synchronize()
            row[f"{name}_first_call_s"] = time.perf_counter() - start
            metrics = torch._dynamo.utils.get_compilation_metrics()
            row[f"{name}_guard_count"] = metrics[-1].guard_count if metrics else None
            steps[name] = {"fwd": layer_step(fn, x, grad, False), "fwd_bwd": layer_step(fn, x, grad, True)}
        samples = {}
        for _ in range(ROUNDS):
            for name, step in steps.items():
                for kind, fn_ in step.items():
                    for suffix, b2b in (("", False), ("_back_to_back", True)):
                        samples.setdefault(f"{name}_{kind}_ms{suffix}", []).append(
                            _cuda_time(fn_, warmup=2, iters=20, back_to_back=b2b))
        row.update({key: sorted(v)[len(v) // 2] for key, v in samples.items()})
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
